//! What a plugin sees of time and chance, and why it cannot use either to escape its limits.
//!
//! A plugin must give the same verdicts on every run, and a batch must end by its deadline.
//! WASI offers two ways around both, closed here:
//!
//! - **Clocks and sleeps.** Both clocks read zero, always. A sleep (`std::thread::sleep`, WASI
//!   `poll` on a `monotonic-clock.subscribe-*` pollable) would wait in the host, in real time,
//!   where wasmtime's epoch deadline cannot reach it: a plugin sleeping an hour held the run for
//!   an hour. ladle replaces the two `subscribe-*` functions: a sleep returns at once, and its
//!   length is charged to the call's deadline as if it had been spent. A sleep that would end
//!   past the deadline stops the call there ([`SleptPastDeadline`]); the epoch deadline is moved
//!   in by what was slept, so sleeping and computing share one budget.
//! - **Randomness.** `wasi:random` draws from a stream that is re-seeded for every call from
//!   the plugin (its bytes and its config) and a name for the batch (the input shard's digest
//!   and the batch's place in it): the same run gives the same bytes, different batches get
//!   different ones, so a plugin that samples "10% at random" samples, reproducibly.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use crate::host::{EPOCH_TICK, State};

/// The interface whose sleeps ladle takes over; the version wasmtime-wasi defines, which a
/// guest's import of any 0.2.x version resolves to.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// A call's time: wall time since it began plus what it slept, against its deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallBudget {
    started: Instant,
    slept: Duration,
    deadline: Duration,
}

impl CallBudget {
    pub(crate) fn new(deadline: Duration) -> CallBudget {
        CallBudget { started: Instant::now(), slept: Duration::ZERO, deadline }
    }

    /// Charges a sleep of `nanos`; the time left, or the error that stops the call.
    fn charge(&mut self, nanos: u64) -> Result<Duration, SleptPastDeadline> {
        let asked = Duration::from_nanos(nanos);
        self.slept = self.slept.saturating_add(asked);
        let used = self.started.elapsed().saturating_add(self.slept);
        self.deadline
            .checked_sub(used)
            .filter(|left| !left.is_zero())
            .ok_or(SleptPastDeadline { asked, deadline: self.deadline })
    }
}

/// Epoch ticks for a deadline `left` from now (whole ticks, at least one, plus the tick in
/// progress).
pub(crate) fn deadline_ticks(left: Duration) -> u64 {
    (left.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
}

/// A sleep that would end past the call's deadline; the host function returns it as a trap.
#[derive(Debug, thiserror::Error)]
#[error("the plugin asked to sleep {} ms, which ends past its deadline of {} ms", .asked.as_millis(), .deadline.as_millis())]
pub struct SleptPastDeadline {
    pub asked: Duration,
    pub deadline: Duration,
}

/// A pollable that is ready at once: what a charged sleep returns.
struct Slept;

#[wasmtime_wasi::async_trait]
impl Pollable for Slept {
    async fn ready(&mut self) {}
}

fn sleep(mut store: StoreContextMut<'_, State>, nanos: u64) -> wasmtime::Result<Resource<DynPollable>> {
    let left = store.data_mut().budget.charge(nanos).map_err(wasmtime::Error::new)?;
    store.set_epoch_deadline(deadline_ticks(left));
    let table = &mut store.data_mut().table;
    let slept = table.push(Slept)?;
    subscribe(table, slept)
}

/// Replaces wasmtime-wasi's `subscribe-duration` and `subscribe-instant` in `linker` (which
/// must already hold WASI) with charged sleeps.
pub(crate) fn link_sleeps(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |store: StoreContextMut<'_, State>, (nanos,): (u64,)| {
        Ok((sleep(store, nanos)?,))
    })?;
    // The clock reads zero, so an instant is also how long to wait for it.
    clock.func_wrap("subscribe-instant", |store: StoreContextMut<'_, State>, (when,): (u64,)| {
        Ok((sleep(store, when)?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A deterministic byte stream for `wasi:random`, re-seeded before every call.
#[derive(Clone)]
pub(crate) struct SeededRandom {
    stream: Arc<Mutex<blake3::OutputReader>>,
}

impl SeededRandom {
    pub(crate) fn new() -> SeededRandom {
        SeededRandom { stream: Arc::new(Mutex::new(blake3::Hasher::new().finalize_xof())) }
    }

    /// Restarts the stream at the one named by `key` (the plugin's), `domain` (which stream) and
    /// `nonce` (the call's).
    pub(crate) fn reseed(&self, key: &[u8; 32], domain: &[u8], nonce: &[u8]) {
        let reader = blake3::Hasher::new_keyed(key).update(domain).update(nonce).finalize_xof();
        *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = reader;
    }
}

impl rand_core::TryRng for SeededRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner()).fill(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand_core::Rng;

    use super::*;

    #[test]
    fn a_sleep_is_charged_against_the_deadline() {
        let mut budget = CallBudget::new(Duration::from_secs(2));
        let left = budget.charge(500_000_000).unwrap();
        assert!(left <= Duration::from_millis(1500) && left > Duration::from_millis(1000), "{left:?}");
        budget.charge(1_000_000_000).unwrap();
        let past = budget.charge(600_000_000).unwrap_err();
        assert_eq!(past.asked, Duration::from_millis(600));
        // An hour, asked at once.
        let mut budget = CallBudget::new(Duration::from_secs(2));
        assert!(budget.charge(3600 * 1_000_000_000).is_err());
        // A sleep of u64::MAX nanoseconds does not overflow.
        assert!(CallBudget::new(Duration::from_secs(2)).charge(u64::MAX).is_err());
    }

    #[test]
    fn the_random_stream_is_the_seed_s_and_only_the_seed_s() {
        let key = [7; 32];
        let mut a = SeededRandom::new();
        let mut b = SeededRandom::new();
        a.reseed(&key, b"", b"batch 1");
        b.reseed(&key, b"", b"batch 1");
        let (x, y) = (a.next_u64(), b.next_u64());
        assert_eq!(x, y);
        assert_ne!(a.next_u64(), x, "the stream moves on");
        // Reseeding restarts it; another nonce or key gives another stream.
        a.reseed(&key, b"", b"batch 1");
        assert_eq!(a.next_u64(), x);
        a.reseed(&key, b"", b"batch 2");
        assert_ne!(a.next_u64(), x);
        a.reseed(&[8; 32], b"", b"batch 1");
        assert_ne!(a.next_u64(), x);
        // The bytes are BLAKE3's keyed XOF of the nonce.
        let mut expected = [0u8; 8];
        blake3::Hasher::new_keyed(&key).update(b"batch 1").finalize_xof().fill(&mut expected);
        assert_eq!(x, u64::from_le_bytes(expected));
    }
}

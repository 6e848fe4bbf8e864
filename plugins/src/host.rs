//! The wasmtime host: compiles plugins once, instantiates them in sandboxed stores, calls them.
//!
//! One `Engine` per process (two, in fact: with and without fuel metering, since fuel is an
//! engine-wide setting that costs time when on), shared by every plugin stage. A background thread
//! advances the engine's epoch every [`EPOCH_TICK`], which is how a batch's deadline is enforced.
//! Each worker gets its own `Store` and instance, reused across batches and re-created after a
//! trap (a trapped instance may be in any state).
//!
//! The sandbox: WASI is linked because std Rust guests import it, but with no capabilities — no
//! preopened folders, no environment, no arguments, no sockets, no stdin. Clocks read zero,
//! sleeps are charged to the deadline and randomness is seeded per call ([`crate::sandbox`]), so
//! a plugin is deterministic and cannot wait past its deadline. stdout is discarded and stderr
//! is captured (64 KiB) so a guest panic message can be shown. Memory is capped with a trap on
//! growth failure.
//!
//! Compiling a component is most of a plugin stage's start-up (seconds for an 18 MB Python
//! component); with a store at hand its compiled form is kept there ([`LadleStore::put_compiled`]),
//! keyed by the `.wasm` digest and the engine's compatibility hash (wasmtime's version, its
//! settings, fuel or not, the CPU's features), and later runs load it in milliseconds. What is
//! loaded is only ever what ladle wrote: the store verifies the bytes' digest (a corrupt entry is
//! quarantined and compiled again), and wasmtime refuses code from another version or setting
//! (then it is compiled again and replaced). The stage key does not change.
//!
//! Text a plugin hands the host (errors, log lines, panic messages) is clipped to
//! [`MAX_PLUGIN_TEXT`] before it is kept anywhere: it ends up in events, run records and the
//! index, and a plugin is not trusted to keep it short.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ladle_engine::Digest;
use ladle_engine::Store as LadleStore;

use crate::sandbox::{CallBudget, SeededRandom, SleptPastDeadline, deadline_ticks, link_sleeps};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({ world: "plugin", path: "wit" });
}

pub use bindings::exports::ladle::filter::filter::Verdict;
use bindings::ladle::filter::host::Level;

/// The WIT package and version this host speaks.
pub const INTERFACE: &str = "ladle:filter/filter@0.1.0";
pub const WORLD: &str = "ladle:filter/plugin@0.1.0";

/// How often the epoch advances; deadlines are whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The most bytes of text from a plugin (an error, a log line, a panic message) that ladle keeps
/// or shows; the rest is cut, and the cut says how much.
pub const MAX_PLUGIN_TEXT: usize = 4096;

/// `text`, cut to at most `max` bytes (at a character boundary) with a note of what was cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes cut]", &text[..end], text.len() - end)
}

/// Limits for one plugin instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_bytes: usize,
    pub batch_timeout: Duration,
    /// Fuel per call (wasm instructions, roughly); `None` for no fuel metering.
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_bytes: 256 << 20, batch_timeout: Duration::from_secs(10), fuel: None }
    }
}

/// Why a call into a plugin failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The plugin answered `err(message)`. The instance is still usable.
    #[error("the plugin returned an error: {0}")]
    Returned(String),
    #[error("the plugin returned {got} verdicts for {want} records")]
    WrongLength { got: usize, want: usize },
    #[error("the plugin ran past its deadline of {0} ms and was stopped")]
    Timeout(u128),
    /// A sleep that would end past the deadline (sleeps count against it).
    #[error("{0}, and was stopped (sleeps count against the deadline)")]
    Slept(String),
    #[error("the plugin ran out of fuel ({0} units per call)")]
    OutOfFuel(u64),
    #[error("the plugin hit its memory limit of {0} MiB")]
    Memory(usize),
    #[error("the plugin trapped: {0}")]
    Trap(String),
}

impl CallError {
    /// Whether the instance must be thrown away.
    pub fn poisons(&self) -> bool {
        !matches!(self, CallError::Returned(_) | CallError::WrongLength { .. })
    }
}

fn engine(fuel: bool) -> &'static Engine {
    static PLAIN: OnceLock<Engine> = OnceLock::new();
    static FUELED: OnceLock<Engine> = OnceLock::new();
    let cell = if fuel { &FUELED } else { &PLAIN };
    cell.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        let engine = Engine::new(&config).expect("a fixed, valid wasmtime configuration");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("ladle-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                }
            })
            .expect("spawn the epoch thread");
        engine
    })
}

/// What a store holds.
pub struct State {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// The time the current call has used (see [`crate::sandbox`]).
    pub(crate) budget: CallBudget,
    random: SeededRandom,
    limits: StoreLimits,
    stderr: MemoryOutputPipe,
    log: Arc<Mutex<PluginLog>>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::ladle::filter::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(&format!("{level}: {}", clip(&message, PluginLog::MAX_LINE)));
    }
}

/// What plugins logged, capped: the most recent lines are kept.
#[derive(Default)]
pub struct PluginLog {
    lines: std::collections::VecDeque<String>,
}

impl PluginLog {
    const MAX_LINES: usize = 1000;
    /// Bytes of one line's message that are kept.
    const MAX_LINE: usize = 1024;

    fn push(&mut self, line: &str) {
        if self.lines.len() == Self::MAX_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }

    pub fn text(&self) -> String {
        self.lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// How a plugin's component was made ready, for the stage's log.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// Compiled here; `kept` when its compiled form went into the store.
    Compiled { seconds: f64, kept: bool },
    /// Loaded from the compiled form a store kept.
    Loaded { seconds: f64 },
    /// The kept form was refused (another wasmtime or setting): compiled again and replaced.
    Replaced { seconds: f64, why: String },
}

impl std::fmt::Display for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prepared::Compiled { seconds, kept: true } => {
                write!(f, "compiled in {seconds:.2} s; its compiled form is kept in the store for later runs")
            }
            Prepared::Compiled { seconds, kept: false } => write!(f, "compiled in {seconds:.2} s"),
            Prepared::Loaded { seconds } => write!(f, "loaded compiled from the store in {seconds:.3} s"),
            Prepared::Replaced { seconds, why } => {
                write!(
                    f,
                    "the compiled form in the store was refused ({why}); compiled again in {seconds:.2} s and replaced"
                )
            }
        }
    }
}

/// Where a component's compiled form is kept: the `.wasm` digest with everything of `engine`
/// that changes the code it makes.
fn compiled_key(engine: &Engine, wasm: &[u8; 32]) -> Digest {
    struct Blake3(blake3::Hasher);
    impl std::hash::Hasher for Blake3 {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            0
        }
    }
    let mut h = Blake3(blake3::Hasher::new_derive_key("ladle compiled plugin component v1"));
    h.0.update(wasm);
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
    Digest(*h.0.finalize().as_bytes())
}

/// A compiled plugin, ready to instantiate.
pub struct Plugin {
    pub name: String,
    /// How its component was made ready.
    pub prepared: Prepared,
    component: Component,
    limits: Limits,
    pre: bindings::PluginPre<State>,
    /// BLAKE3 of the component's bytes: with the config, what seeds its randomness.
    digest: [u8; 32],
    pub log: Arc<Mutex<PluginLog>>,
}

/// Why a plugin could not be loaded; the messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not WebAssembly{hint}")]
    NotWasm { path: String, hint: String },
    #[error(
        "{path} is a core WebAssembly module, not a component\n  hint: build plugins for the wasm32-wasip2 target (`cargo build --release --target wasm32-wasip2`), which makes components"
    )]
    CoreModule { path: String },
    #[error("{path} is not a valid component: {message}")]
    Invalid { path: String, message: String },
    #[error("{path} does not fit ladle's plugin interface ({WORLD}): {message}\n  hint: {hint}")]
    Interface { path: String, message: String, hint: String },
}

/// The kind of a wasm binary, from its header.
fn header_kind(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return None;
    }
    Some(if bytes[4..8] == [1, 0, 0, 0] { "module" } else { "component" })
}

impl Plugin {
    /// Compiles the plugin at `path` and checks it against the interface.
    pub fn load(path: &Path, limits: Limits) -> Result<Plugin, LoadError> {
        Self::load_kept(path, limits, None)
    }

    /// [`Plugin::load`], keeping its compiled form in `store` (or loading it from there).
    pub fn load_kept(path: &Path, limits: Limits, store: Option<&LadleStore>) -> Result<Plugin, LoadError> {
        let bytes =
            std::fs::read(path).map_err(|source| LoadError::Read { path: path.display().to_string(), source })?;
        let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "plugin".into());
        Self::from_bytes_kept(&bytes, &path.display().to_string(), name, limits, store)
    }

    pub fn from_bytes(bytes: &[u8], path: &str, name: String, limits: Limits) -> Result<Plugin, LoadError> {
        Self::from_bytes_kept(bytes, path, name, limits, None)
    }

    fn from_bytes_kept(
        bytes: &[u8],
        path: &str,
        name: String,
        limits: Limits,
        store: Option<&LadleStore>,
    ) -> Result<Plugin, LoadError> {
        let path = path.to_string();
        match header_kind(bytes) {
            None if bytes.starts_with(b"(") => {}
            None => {
                return Err(LoadError::NotWasm {
                    path,
                    hint: "\n  hint: a plugin is a .wasm component; see `ladle plugin new`".into(),
                });
            }
            Some("module") => return Err(LoadError::CoreModule { path }),
            Some(_) => {}
        }
        let engine = engine(limits.fuel.is_some());
        let digest = *blake3::hash(bytes).as_bytes();
        let started = Instant::now();
        let compile = || {
            Component::new(engine, bytes)
                .map_err(|e| LoadError::Invalid { path: path.clone(), message: format!("{e:#}") })
        };
        let key = compiled_key(engine, &digest);
        // A store that cannot be read (a worker's view, an I/O error) only means compiling.
        let kept = store.and_then(|s| s.get_compiled(&key).ok().flatten());
        let (component, prepared) = match kept {
            Some(code) => {
                // SAFETY: the bytes are a `Component::serialize` that ladle wrote into the store,
                // read back under their BLAKE3 digest (a changed byte is refused before this);
                // wasmtime checks its own version and settings in their header.
                match unsafe { Component::deserialize(engine, &code) } {
                    Ok(c) => (c, Prepared::Loaded { seconds: started.elapsed().as_secs_f64() }),
                    Err(e) => {
                        let c = compile()?;
                        if let (Some(s), Ok(code)) = (store, c.serialize()) {
                            let _ = s.put_compiled(&key, &code);
                        }
                        let why = format!("{e:#}").lines().next().unwrap_or_default().to_string();
                        (c, Prepared::Replaced { seconds: started.elapsed().as_secs_f64(), why })
                    }
                }
            }
            None => {
                let c = compile()?;
                let seconds = started.elapsed().as_secs_f64();
                let kept = match store {
                    Some(s) => c.serialize().ok().is_some_and(|code| s.put_compiled(&key, &code).unwrap_or(false)),
                    None => false,
                };
                (c, Prepared::Compiled { seconds, kept })
            }
        };
        let mut linker: Linker<State> = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|()| link_sleeps(&mut linker))
            .map_err(|e| LoadError::Invalid { path: path.clone(), message: format!("{e:#}") })?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| LoadError::Invalid { path: path.clone(), message: format!("{e:#}") })?;
        let interface_error = |e: wasmtime::Error| {
            let message = format!("{e:#}");
            let exports = crate::check::exports(&component, engine);
            let hint = interface_hint(&message, &exports);
            LoadError::Interface { path: path.clone(), message, hint }
        };
        let instance_pre = linker.instantiate_pre(&component).map_err(interface_error)?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(interface_error)?;
        Ok(Plugin { name, prepared, component, limits, pre, digest, log: Arc::default() })
    }

    pub fn component(&self) -> &Component {
        &self.component
    }

    /// A new instance, configured with `config` (JSON).
    pub fn instantiate(&self, config: &str) -> Result<Instance, CallError> {
        let engine = self.pre.engine();
        let stderr = MemoryOutputPipe::new(64 * 1024);
        let random_key = blake3::Hasher::new_derive_key("ladle plugin randomness v1")
            .update(&self.digest)
            .update(config.as_bytes())
            .finalize();
        let random_key = *random_key.as_bytes();
        let (secure, insecure) = (SeededRandom::new(), SeededRandom::new());
        let insecure_seed = u128::from_le_bytes(random_key[..16].try_into().expect("16 of 32 bytes"));
        let wasi = WasiCtxBuilder::new()
            .stdout(std::io::empty())
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(secure.clone())
            .insecure_random(insecure.clone())
            .insecure_random_seed(insecure_seed)
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .instances(16)
            .trap_on_grow_failure(true)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            budget: CallBudget::new(self.limits.batch_timeout),
            random: secure,
            limits,
            stderr,
            log: self.log.clone(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        let mut instance = Instance { store, bindings: None, limits: self.limits, random_key, insecure };
        instance.arm(b"instantiate");
        let bindings = self.pre.instantiate(&mut instance.store).map_err(|e| instance.classify(e))?;
        instance.arm(b"configure");
        match bindings.ladle_filter_filter().call_configure(&mut instance.store, config) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(CallError::Returned(format!(
                    "it rejected its config: {}",
                    clip(&message, MAX_PLUGIN_TEXT)
                )));
            }
            Err(e) => return Err(instance.classify(e)),
        }
        instance.bindings = Some(bindings);
        Ok(instance)
    }
}

fn interface_hint(message: &str, exports: &[String]) -> String {
    let other_version = exports.iter().find(|e| e.starts_with("ladle:filter/filter@") && e.as_str() != INTERFACE);
    match other_version {
        Some(v) => format!("it was built against {v}; this ladle speaks {INTERFACE}: rebuild it with the current ladle-plugin SDK"),
        None if message.contains("import") => {
            "it imports something the sandbox does not offer: plugins get only WASI (with no capabilities) and ladle's `host` interface".into()
        }
        None => format!(
            "a plugin must export {INTERFACE}; this component exports {}",
            if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
        ),
    }
}

struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// One instantiated plugin: a store and the component's exports.
pub struct Instance {
    store: Store<State>,
    bindings: Option<bindings::Plugin>,
    limits: Limits,
    /// Seeds the randomness of every call, with the call's nonce.
    random_key: [u8; 32],
    /// The `wasi:random/insecure` stream (the secure one is in the store's state).
    insecure: SeededRandom,
}

impl Instance {
    /// Sets the deadline, the fuel and the randomness for the next call, named by `nonce`.
    fn arm(&mut self, nonce: &[u8]) {
        self.store.set_epoch_deadline(deadline_ticks(self.limits.batch_timeout));
        if let Some(fuel) = self.limits.fuel {
            let _ = self.store.set_fuel(fuel);
        }
        let state = self.store.data_mut();
        state.budget = CallBudget::new(self.limits.batch_timeout);
        state.random.reseed(&self.random_key, b"secure:", nonce);
        self.insecure.reseed(&self.random_key, b"insecure:", nonce);
    }

    fn classify(&mut self, e: wasmtime::Error) -> CallError {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => return CallError::Timeout(self.limits.batch_timeout.as_millis()),
            Some(Trap::OutOfFuel) => return CallError::OutOfFuel(self.limits.fuel.unwrap_or(0)),
            _ => {}
        }
        if let Some(slept) = e.downcast_ref::<SleptPastDeadline>() {
            return CallError::Slept(slept.to_string());
        }
        let message = clip(&format!("{e:#}"), MAX_PLUGIN_TEXT);
        if message.contains("growing memory") || message.contains("memory minimum size") {
            return CallError::Memory(self.limits.memory_bytes >> 20);
        }
        let stderr = String::from_utf8_lossy(&self.store.data().stderr.contents()).trim().to_string();
        if stderr.is_empty() {
            CallError::Trap(message)
        } else {
            CallError::Trap(format!("{message}\n  plugin stderr: {}", clip(&stderr, MAX_PLUGIN_TEXT)))
        }
    }

    /// One verdict per record of `batch`. `nonce` names the batch (the same batch, the same
    /// nonce): it seeds the plugin's randomness for this call.
    pub fn filter(&mut self, batch: &[String], nonce: &[u8]) -> Result<Vec<Verdict>, CallError> {
        self.arm(nonce);
        let bindings =
            self.bindings.as_ref().ok_or_else(|| CallError::Trap("the instance was not configured".into()))?;
        let result = bindings.ladle_filter_filter().call_filter(&mut self.store, batch);
        match result {
            Ok(Ok(verdicts)) if verdicts.len() == batch.len() => Ok(verdicts),
            Ok(Ok(verdicts)) => Err(CallError::WrongLength { got: verdicts.len(), want: batch.len() }),
            Ok(Err(message)) => Err(CallError::Returned(clip(&message, MAX_PLUGIN_TEXT))),
            Err(e) => Err(self.classify(e)),
        }
    }
}

//! ladle's WASM plugin host: sandboxed custom data filters as WebAssembly components.
//!
//! - [`host`]: the wasmtime host — one shared engine, sandboxed stores, limits, calls;
//! - [`sandbox`]: what a plugin sees of time and chance (sleeps charged to the deadline,
//!   randomness seeded per batch);
//! - [`stage`]: the `plugin` stage kind (a map stage);
//! - [`check`]: `ladle plugin check`, validating a component against the interface;
//! - [`scaffold`]: `ladle plugin new`, a ready-to-build plugin crate.
//!
//! The interface is `wit/filter.wit` (`ladle:filter@0.1.0`); the guest SDK is `sdk/`
//! (crate `ladle-plugin`). This crate depends on `ladle-engine` only.

pub mod check;
pub mod host;
pub mod sandbox;
pub mod scaffold;
pub mod stage;

use std::sync::Arc;

/// Registers the `plugin` stage kind.
pub fn register(registry: &mut ladle_engine::Registry) {
    registry.register(Arc::new(stage::PluginKind));
}

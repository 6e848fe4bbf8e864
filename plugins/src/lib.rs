//! ladle's WASM plugin host (wasmtime, component model): sandboxed custom data filters.
//!
//! Empty until the plugin issue lands: the WIT interface under `plugins/wit/`, the host, the
//! `plugin` stage kind, and the guest SDK in `plugins/sdk`. It depends on `ladle-engine` only.

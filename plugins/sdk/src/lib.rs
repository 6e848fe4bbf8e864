//! Write ladle filter plugins in Rust.
//!
//! A plugin is a WebAssembly component that gets records one batch at a time and answers, for
//! each, keep, drop, or replace. With this crate it is a type that implements [`Filter`] and one
//! line that exports it:
//!
//! ```ignore
//! use ladle_plugin::{Filter, Value, Verdict, export_filter};
//!
//! struct MinWords { min: usize }
//!
//! impl Filter for MinWords {
//!     fn new(config: Value) -> Result<Self, String> {
//!         Ok(MinWords { min: config["min_words"].as_u64().unwrap_or(4) as usize })
//!     }
//!     fn filter(&mut self, record: Value) -> Result<Verdict, String> {
//!         let caption = record["caption"].as_str().ok_or("the record has no `caption`")?;
//!         Ok(if caption.split_whitespace().count() >= self.min { Verdict::Keep } else { Verdict::Drop })
//!     }
//! }
//!
//! export_filter!(MinWords);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and check it with
//! `ladle plugin check target/wasm32-wasip2/release/NAME.wasm`. The plugin runs sandboxed: it sees
//! no files, network, environment or clock, and randomness that is the same on every run; what
//! it needs comes through `config`.
//! The interface is `wit/filter.wit` (`ladle:filter@0.1.0`).

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "wit",
        pub_export_macro: true,
        default_bindings_module: "ladle_plugin::bindings",
    });
}

pub use serde_json::{self, Value, json};

/// What to do with one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Keep,
    Drop,
    /// Keep this record instead. It must be a JSON object.
    Replace(Value),
}

/// A filter: built once per plugin instance from the stage's `config`, then called per record.
pub trait Filter: Sized + 'static {
    /// Builds the filter from the stage's `config` table (`Value::Null` when the stage has none).
    fn new(config: Value) -> Result<Self, String>;

    /// The verdict for one record. An `Err` fails the batch holding the record, with the message.
    fn filter(&mut self, record: Value) -> Result<Verdict, String>;
}

/// Lines for the stage's log, shown by `ladle show`.
pub mod log {
    use crate::bindings::ladle::filter::host::{Level, log};

    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// Exports a [`Filter`] as the plugin's implementation of the interface. Use it once per plugin.
#[macro_export]
macro_rules! export_filter {
    ($filter:ty) => {
        struct __LadleFilterExport;

        impl $crate::bindings::exports::ladle::filter::filter::Guest for __LadleFilterExport {
            fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__private::configure::<$filter>(&config)
            }

            fn filter(
                batch: ::std::vec::Vec<::std::string::String>,
            ) -> ::std::result::Result<
                ::std::vec::Vec<$crate::bindings::exports::ladle::filter::filter::Verdict>,
                ::std::string::String,
            > {
                $crate::__private::filter::<$filter>(batch)
            }
        }

        $crate::bindings::export!(__LadleFilterExport with_types_in $crate::bindings);
    };
}

#[doc(hidden)]
pub mod __private {
    use std::any::Any;
    use std::cell::RefCell;

    use crate::bindings::exports::ladle::filter::filter::Verdict as WitVerdict;
    use crate::{Filter, Value, Verdict};

    thread_local! {
        static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    pub fn configure<F: Filter>(config: &str) -> Result<(), String> {
        let config: Value = serde_json::from_str(config).map_err(|e| format!("the config is not JSON: {e}"))?;
        let filter = F::new(config)?;
        STATE.with(|s| *s.borrow_mut() = Some(Box::new(filter)));
        Ok(())
    }

    pub fn filter<F: Filter>(batch: Vec<String>) -> Result<Vec<WitVerdict>, String> {
        STATE.with(|s| {
            let mut state = s.borrow_mut();
            let filter = state
                .as_mut()
                .and_then(|b| b.downcast_mut::<F>())
                .ok_or_else(|| "filter called before configure".to_string())?;
            batch.into_iter().enumerate().map(|(i, text)| verdict(filter, i, &text)).collect()
        })
    }

    fn verdict<F: Filter>(filter: &mut F, i: usize, text: &str) -> Result<WitVerdict, String> {
        let record: Value =
            serde_json::from_str(text).map_err(|e| format!("record {i} of the batch is not JSON: {e}"))?;
        Ok(match filter.filter(record)? {
            Verdict::Keep => WitVerdict::Keep,
            Verdict::Drop => WitVerdict::Drop,
            Verdict::Replace(v @ Value::Object(_)) => WitVerdict::Replace(v.to_string()),
            Verdict::Replace(other) => {
                return Err(format!("record {i}: a replacement must be a JSON object, not {other}"));
            }
        })
    }
}

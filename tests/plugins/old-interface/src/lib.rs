//! A plugin built against an older version of the interface (`ladle:filter@0.0.9`), as a plugin
//! compiled before an interface change would be. ladle must refuse it with a clear message.

wit_bindgen::generate!({ world: "plugin", path: "wit" });

use exports::ladle::filter::filter::{Guest, Verdict};

struct Old;

impl Guest for Old {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }
    fn filter(batch: Vec<String>) -> Result<Vec<Verdict>, String> {
        Ok(batch.iter().map(|_| Verdict::Keep).collect())
    }
}

export!(Old);

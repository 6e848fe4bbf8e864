//! `min-words`: drop records whose caption has fewer than `min_words` words.
//!
//! Config: `min_words` (default 4), `field` (default `"caption"`). Words are what
//! `split_whitespace` splits. A record without the field (or with a non-string) is an error.

use ladle_plugin::{Filter, Value, Verdict, export_filter};

struct MinWords {
    min_words: usize,
    field: String,
}

impl Filter for MinWords {
    fn new(config: Value) -> Result<Self, String> {
        let min_words = match &config["min_words"] {
            Value::Null => 4,
            v => v.as_u64().ok_or_else(|| format!("`min_words` must be a non-negative integer, not {v}"))? as usize,
        };
        let field = config["field"].as_str().unwrap_or("caption").to_string();
        Ok(MinWords { min_words, field })
    }

    fn filter(&mut self, record: Value) -> Result<Verdict, String> {
        let text =
            record[&self.field].as_str().ok_or_else(|| format!("the record has no string field `{}`", self.field))?;
        Ok(if text.split_whitespace().count() >= self.min_words { Verdict::Keep } else { Verdict::Drop })
    }
}

export_filter!(MinWords);

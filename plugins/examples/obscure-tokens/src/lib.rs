//! `obscure-tokens`: drop captions dominated by serial numbers, version strings and part codes,
//! the content POINTS found at the high-perplexity end of its data.
//!
//! Tokens are whitespace-separated, with surrounding punctuation `,;:()[]{}"'!?` trimmed. A token
//! is obscure when it holds an ASCII digit and also a letter or one of `-._/#:` (`SN-4471-AX`,
//! `v2.3.1`, `X200T`, `2.0`); plain numbers (`1990`, `3`) are not. A record is dropped when more
//! than `max_fraction` of its tokens are obscure.
//!
//! Config: `field` (default `"caption"`), `max_fraction` (default 0.4).

use ladle_plugin::{Filter, Value, Verdict, export_filter};

struct ObscureTokens {
    field: String,
    max_fraction: f64,
}

fn is_obscure(token: &str) -> bool {
    let t = token.trim_matches(|c: char| ",;:()[]{}\"'!?".contains(c));
    let digit = t.chars().any(|c| c.is_ascii_digit());
    let letter_or_sep = t.chars().any(|c| c.is_alphabetic() || "-._/#:".contains(c));
    digit && letter_or_sep
}

impl Filter for ObscureTokens {
    fn new(config: Value) -> Result<Self, String> {
        let max_fraction = match &config["max_fraction"] {
            Value::Null => 0.4,
            v => v
                .as_f64()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| format!("`max_fraction` must be a number in [0, 1], not {v}"))?,
        };
        Ok(ObscureTokens { field: config["field"].as_str().unwrap_or("caption").to_string(), max_fraction })
    }

    fn filter(&mut self, record: Value) -> Result<Verdict, String> {
        let caption =
            record[&self.field].as_str().ok_or_else(|| format!("the record has no string field `{}`", self.field))?;
        let tokens: Vec<&str> = caption.split_whitespace().collect();
        if tokens.is_empty() {
            return Ok(Verdict::Keep);
        }
        let obscure = tokens.iter().filter(|t| is_obscure(t)).count();
        Ok(if obscure as f64 / tokens.len() as f64 > self.max_fraction { Verdict::Drop } else { Verdict::Keep })
    }
}

export_filter!(ObscureTokens);

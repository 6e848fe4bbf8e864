//! `caption-clean`: clean a caption; replace the record when the caption changed.
//!
//! In order: remove HTML tags (`<` followed by a letter, `/` or `!`, up to the next `>`); decode
//! the entities `&amp; &lt; &gt; &quot; &#39; &nbsp;`; remove URLs (whitespace-separated tokens
//! starting with `http://`, `https://` or `www.`); collapse runs of whitespace to one space and
//! trim. A caption left empty drops the record (unless `drop_empty = false`).
//!
//! Config: `field` (default `"caption"`), `drop_empty` (default true).

use ladle_plugin::{Filter, Value, Verdict, export_filter};

struct CaptionClean {
    field: String,
    drop_empty: bool,
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        let after = &rest[i + 1..];
        let tag_like = after.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match (tag_like, after.find('>')) {
            (true, Some(j)) => {
                out.push_str(&rest[..i]);
                out.push(' ');
                rest = &after[j + 1..];
            }
            _ => {
                out.push_str(&rest[..=i]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_entities(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

fn is_url(token: &str) -> bool {
    let t = token.to_ascii_lowercase();
    t.starts_with("http://") || t.starts_with("https://") || t.starts_with("www.")
}

fn clean(caption: &str) -> String {
    let text = decode_entities(&strip_tags(caption));
    text.split_whitespace().filter(|t| !is_url(t)).collect::<Vec<_>>().join(" ")
}

impl Filter for CaptionClean {
    fn new(config: Value) -> Result<Self, String> {
        Ok(CaptionClean {
            field: config["field"].as_str().unwrap_or("caption").to_string(),
            drop_empty: config["drop_empty"].as_bool().unwrap_or(true),
        })
    }

    fn filter(&mut self, mut record: Value) -> Result<Verdict, String> {
        let caption =
            record[&self.field].as_str().ok_or_else(|| format!("the record has no string field `{}`", self.field))?;
        let cleaned = clean(caption);
        if cleaned.is_empty() && self.drop_empty {
            return Ok(Verdict::Drop);
        }
        if cleaned == caption {
            return Ok(Verdict::Keep);
        }
        record[&self.field] = Value::String(cleaned);
        Ok(Verdict::Replace(record))
    }
}

export_filter!(CaptionClean);

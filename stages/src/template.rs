//! Field templates: `"{caption}"`, `"{meta.source}/{id}"`, `{{` and `}}` for literal braces.
//!
//! Used wherever a stage takes text from records (`dedup`'s key, the perplexity stage's text and
//! prompt). A template is parsed once, when the pipeline is loaded, so a malformed one is an error
//! in the pipeline file, not in the middle of a run.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    /// A field path: `meta.source` is `["meta", "source"]`.
    Field(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!(
                                    "unclosed `{{` in template \"{src}\" (write `{{{{` for a literal brace)"
                                ));
                            }
                        }
                    }
                    let name = name.trim();
                    if name.is_empty() || name.split('.').any(|p| p.is_empty()) {
                        return Err(format!("empty or malformed field name `{{{name}}}` in template \"{src}\""));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field(name.split('.').map(str::to_string).collect()));
                }
                '}' => return Err(format!("unmatched `}}` in template \"{src}\" (write `}}}}` for a literal brace)")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template { pieces })
    }

    /// The fields the template reads, as written (`meta.source`).
    pub fn fields(&self) -> Vec<String> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Field(path) => Some(path.join(".")),
                Piece::Text(_) => None,
            })
            .collect()
    }

    /// The raw value of the one field the template is made of (`"{image}"`), or `None` when the
    /// template has text or several fields. A missing field is an error naming it.
    pub fn single_field<'r>(&self, record: &'r Map<String, Value>) -> Option<Result<&'r Value, String>> {
        let [Piece::Field(path)] = self.pieces.as_slice() else { return None };
        let mut cur: Option<&Value> = record.get(&path[0]);
        for part in &path[1..] {
            cur = cur.and_then(|v| v.get(part));
        }
        Some(cur.ok_or_else(|| format!("the record has no field `{}`", path.join("."))))
    }

    /// Renders the template over a record. Strings are inserted as they are, other values as
    /// compact JSON; a missing or null field is an error naming it.
    pub fn render(&self, record: &Map<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(path) => {
                    let mut cur: Option<&Value> = record.get(&path[0]);
                    for part in &path[1..] {
                        cur = cur.and_then(|v| v.get(part));
                    }
                    match cur {
                        None | Some(Value::Null) => {
                            return Err(format!("the record has no field `{}`", path.join(".")));
                        }
                        Some(Value::String(s)) => out.push_str(s),
                        Some(v) => out.push_str(&v.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_fields_nested_paths_and_escapes() {
        let t = Template::parse("{{id}} {id}: {meta.src}/{n}").unwrap();
        let r = rec(json!({"id": "a", "meta": {"src": "web"}, "n": 3}));
        assert_eq!(t.render(&r).unwrap(), "{id} a: web/3");
        assert_eq!(t.fields(), vec!["id", "meta.src", "n"]);
    }

    #[test]
    fn reports_missing_fields_and_bad_templates() {
        let t = Template::parse("{caption}").unwrap();
        assert_eq!(t.render(&rec(json!({"x": 1}))).unwrap_err(), "the record has no field `caption`");
        assert!(Template::parse("{open").is_err());
        assert!(Template::parse("close}").is_err());
        assert!(Template::parse("{}").is_err());
        assert!(Template::parse("{a..b}").is_err());
    }
}

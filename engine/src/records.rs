//! Records and their canonical encoding.
//!
//! A shard is canonical JSONL: one record per line, each a JSON object written compactly with its
//! keys sorted (recursively), ending in `\n`. Equal records therefore have equal bytes whatever key
//! order or whitespace their source had, which is what the shard and dataset digests are over.
//! Stages that only pass records through (select, concat, write to JSONL) copy lines as bytes and
//! never re-parse them.

use serde_json::{Map, Value};

/// The lines of a JSONL buffer, without their `\n`.
pub fn lines(jsonl: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = jsonl.strip_suffix(b"\n").unwrap_or(jsonl);
    let empty = body.is_empty();
    body.split(|b| *b == b'\n').filter(move |_| !empty)
}

/// Appends `record` canonically, with its newline.
pub fn write_record(record: &Map<String, Value>, out: &mut Vec<u8>) {
    write_object(record, out);
    out.push(b'\n');
}

/// Appends `value` canonically (sorted keys, compact).
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => write_object(map, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing JSON to memory cannot fail"),
    }
}

fn write_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, k).expect("writing JSON to memory cannot fail");
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

/// Parses one line as a record (a JSON object), saying what is wrong if it is not one.
pub fn parse_record(line: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("expected a JSON object, found {}", json_type(&other))),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Canonical JSONL of `records`.
pub fn to_jsonl<'a>(records: impl IntoIterator<Item = &'a Map<String, Value>>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        write_record(r, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_sorts_keys_recursively_and_is_compact() {
        let a = parse_record(br#"{ "b": 1, "a": {"z": [1, {"y":2,"x":3}], "c": "\u00e9"} }"#).unwrap();
        let mut out = Vec::new();
        write_record(&a, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "{\"a\":{\"c\":\"é\",\"z\":[1,{\"x\":3,\"y\":2}]},\"b\":1}\n");
    }

    #[test]
    fn lines_skips_only_the_final_newline() {
        assert_eq!(lines(b"a\nb\n").collect::<Vec<_>>(), vec![&b"a"[..], b"b"]);
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"a").count(), 1);
    }

    #[test]
    fn rejects_non_objects() {
        assert_eq!(parse_record(b"[1]").unwrap_err(), "expected a JSON object, found an array");
        assert!(parse_record(b"{").unwrap_err().starts_with("invalid JSON"));
    }
}

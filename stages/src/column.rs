//! One numeric column of canonical records, read without parsing the rest: what `select` sorts
//! by and what `ladle report` draws histograms of. Other fields are skipped unparsed, so a pass
//! over a million records costs little more than reading them.

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// The value of one top-level field of a JSON object, other fields skipped unparsed.
struct Column<'a>(&'a str);

/// A record's value in the column.
#[derive(Debug, PartialEq)]
pub enum Cell {
    Missing,
    Number(f64),
    NotANumber(&'static str),
}

impl<'de> DeserializeSeed<'de> for Column<'_> {
    type Value = Cell;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Column<'_> {
    type Value = Cell;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cell, A::Error> {
        let mut cell = Cell::Missing;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 {
                let v: serde_json::Value = map.next_value()?;
                cell = match v {
                    serde_json::Value::Number(n) => {
                        n.as_f64().map(Cell::Number).unwrap_or(Cell::NotANumber("a number out of range"))
                    }
                    serde_json::Value::Null => Cell::Missing,
                    other => Cell::NotANumber(ladle_engine::records::json_type(&other)),
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(cell)
    }
}

/// The value of `column` in one canonical JSONL line.
pub fn read_cell(line: &[u8], column: &str) -> Result<Cell, String> {
    let mut de = serde_json::Deserializer::from_slice(line);
    Column(column).deserialize(&mut de).map_err(|e| format!("invalid record: {e}"))
}

//! Parameter values as written in a pipeline file, each with the place it was written.
//!
//! The TOML parser's spans are byte offsets; they are resolved to line and column once, here, so
//! every later error can name `file:line:column`.

use std::collections::BTreeMap;
use std::path::Path;

use toml::de::{DeTable, DeValue};

use crate::error::Location;

/// A value from the pipeline file and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub value: Value,
    pub at: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Param>),
    Table(BTreeMap<String, Param>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

impl Param {
    /// The value as JSON (for canonical parameters and plugin configs).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::String(s) | Value::Datetime(s) => serde_json::Value::String(s.clone()),
            Value::Integer(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or_else(|| serde_json::Value::String(f.to_string())),
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Param::to_json).collect()),
            Value::Table(t) => serde_json::Value::Object(t.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
        }
    }
}

/// Resolves byte offsets of one file to line and column.
pub struct LineIndex<'a> {
    file: &'a Path,
    source: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(file: &'a Path, source: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { file, source, line_starts }
    }

    pub fn locate(&self, offset: usize) -> Location {
        let offset = offset.min(self.source.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let column = self.source.get(start..offset).map(|s| s.chars().count()).unwrap_or(offset - start) + 1;
        Location { file: self.file.to_path_buf(), line: line + 1, column }
    }
}

/// Converts a parsed TOML value (borrowing the source) into an owned, located [`Param`].
pub fn convert(value: &DeValue<'_>, offset: usize, lines: &LineIndex<'_>) -> Param {
    let at = lines.locate(offset);
    let value = match value {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(v) => Value::Integer(v),
            // Out of i64's range: keep it as a float so validation reports it as a number.
            Err(_) => Value::Float(i.as_str().parse().unwrap_or(f64::INFINITY)),
        },
        DeValue::Float(f) => Value::Float(parse_toml_float(f.as_str())),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(a) => Value::Array(a.iter().map(|v| convert(v.get_ref(), v.span().start, lines)).collect()),
        DeValue::Table(t) => Value::Table(convert_table(t, lines)),
    };
    Param { value, at }
}

pub fn convert_table(table: &DeTable<'_>, lines: &LineIndex<'_>) -> BTreeMap<String, Param> {
    table.iter().map(|(k, v)| (k.get_ref().to_string(), convert(v.get_ref(), k.span().start, lines))).collect()
}

fn parse_toml_float(s: &str) -> f64 {
    let cleaned: String = s.chars().filter(|c| *c != '_').collect();
    match cleaned.as_str() {
        "inf" | "+inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        "nan" | "+nan" | "-nan" => f64::NAN,
        other => other.parse().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_and_columns() {
        let src = "a = 1\nbé = 2\n";
        let idx = LineIndex::new(Path::new("p.toml"), src);
        let loc = idx.locate(src.find('2').unwrap());
        assert_eq!((loc.line, loc.column), (2, 6));
        assert_eq!(idx.locate(0).line, 1);
    }
}

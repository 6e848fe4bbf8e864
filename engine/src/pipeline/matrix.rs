//! Matrix stages: one declaration, one stage per combination of values.
//!
//! `[stages.ft] matrix = { mix = ["a", "b"], lr = [1e-5, 2e-5] }` declares `ft.a.1e-5`,
//! `ft.a.2e-5`, `ft.b.1e-5` and `ft.b.2e-5`: the name, then each axis's value in the order the
//! axes are written, joined by dots (values written as [`scalar_text`] writes them; characters a
//! name cannot hold become `_`). The first axis varies slowest, so the stages come in the order
//! a reader expects. Each expansion is an ordinary stage: its key holds only the values its
//! parameters were filled with, so adding a value adds stages and leaves the others cached.
//!
//! Why names rather than indices: they say what a stage is in `plan`, logs and errors, and they do
//! not shift when a value is added in the middle of an axis (an index would rename every stage
//! after it, and the store would not care, but every person reading a plan would).

use std::collections::{BTreeMap, BTreeSet};

use super::interpolate::scalar_text;
use super::value::{Param, Value};
use crate::error::PipelineError;

/// Where an expanded stage came from (for `graph`'s grouping and `show`).
#[derive(Debug, Clone, PartialEq)]
pub struct MatrixOrigin {
    /// The name as declared (`ft`).
    pub declared: String,
    /// Axis and value text, in the order the axes are written.
    pub values: Vec<(String, String)>,
}

/// One combination of a matrix.
#[derive(Debug)]
pub struct Expansion {
    pub name: String,
    /// Axis → value, what `${matrix.AXIS}` reads.
    pub values: BTreeMap<String, Param>,
    pub origin: MatrixOrigin,
}

/// Expands the `matrix` of stage `stage`: `axes` in written order, each with its (already
/// vars-interpolated) value.
pub fn expand(stage: &str, matrix: &Param, axes: &[(String, Param)]) -> Result<Vec<Expansion>, PipelineError> {
    let error = |at: &Param, message: String, hint: Option<String>| PipelineError {
        location: at.at.clone(),
        stage: Some(stage.to_string()),
        message,
        hint,
    };
    if axes.is_empty() {
        return Err(error(
            matrix,
            "`matrix` is empty: it needs at least one axis".into(),
            Some("matrix = { AXIS = [value, value, ...] }".into()),
        ));
    }
    let mut columns: Vec<(&str, Vec<(&Param, String)>)> = Vec::new();
    for (axis, values) in axes {
        if axis.is_empty() || !axis.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(error(
                values,
                format!("matrix axis `{axis}`: a name may hold only letters, digits, `_` and `-`"),
                None,
            ));
        }
        let Value::Array(items) = &values.value else {
            return Err(error(
                values,
                format!("matrix axis `{axis}` must be an array of values, found {}", values.value.type_name()),
                Some(format!("{axis} = [\"a\", \"b\"]")),
            ));
        };
        if items.is_empty() {
            return Err(error(
                values,
                format!("matrix axis `{axis}` has no values, so the stage would expand to nothing"),
                Some("give it at least one value, or remove the stage".into()),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut column = Vec::new();
        for item in items {
            let Some(text) = scalar_text(&item.value) else {
                return Err(error(
                    item,
                    format!(
                        "matrix axis `{axis}` holds {}; its values must be strings, numbers or booleans",
                        item.value.type_name()
                    ),
                    None,
                ));
            };
            if !seen.insert(text.clone()) {
                return Err(error(item, format!("matrix axis `{axis}` lists `{text}` twice"), None));
            }
            column.push((item, text));
        }
        columns.push((axis.as_str(), column));
    }
    let mut out: Vec<Expansion> = Vec::new();
    let mut names: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let total: usize = columns.iter().map(|(_, c)| c.len()).product();
    for n in 0..total {
        // Mixed-radix digits, the first axis most significant.
        let mut rest = n;
        let mut picks = vec![0; columns.len()];
        for (i, (_, column)) in columns.iter().enumerate().rev() {
            picks[i] = rest % column.len();
            rest /= column.len();
        }
        let mut name = stage.to_string();
        let mut values = BTreeMap::new();
        let mut labels = Vec::new();
        for ((axis, column), &pick) in columns.iter().zip(&picks) {
            let (param, text) = &column[pick];
            name.push('.');
            name.push_str(&name_part(text));
            values.insert(axis.to_string(), (*param).clone());
            labels.push((axis.to_string(), text.clone()));
        }
        if let Some(earlier) = names.get(&name) {
            let show =
                |l: &[(String, String)]| l.iter().map(|(a, v)| format!("{a} = {v:?}")).collect::<Vec<_>>().join(", ");
            return Err(error(
                matrix,
                format!("two combinations of the matrix make the same stage name `{name}`: ({}) and ({})", show(earlier), show(&labels)),
                Some("values that differ only in characters a stage name cannot hold (or in where dots fall) clash; make them differ in letters or digits".into()),
            ));
        }
        names.insert(name.clone(), labels.clone());
        out.push(Expansion { name, values, origin: MatrixOrigin { declared: stage.to_string(), values: labels } });
    }
    Ok(out)
}

/// A value as part of a stage name: letters, digits, `_`, `-` and `.` kept, anything else `_`.
fn name_part(text: &str) -> String {
    let part: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') { c } else { '_' }).collect();
    if part.is_empty() { "_".into() } else { part }
}

/// Whether stage name `name` matches `pattern`, where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;

    fn p(value: Value) -> Param {
        Param { value, at: Location { file: "p.toml".into(), line: 4, column: 1 } }
    }
    fn strings(v: &[&str]) -> Param {
        p(Value::Array(v.iter().map(|s| p(Value::String(s.to_string()))).collect()))
    }

    #[test]
    fn a_three_by_two_matrix_makes_six_named_stages_first_axis_slowest() {
        let axes = vec![
            ("mix".to_string(), strings(&["a", "b", "c"])),
            ("lr".to_string(), p(Value::Array(vec![p(Value::Float(1e-5)), p(Value::Float(2e-5))]))),
        ];
        let e = expand("ft", &p(Value::Table(Default::default())), &axes).unwrap();
        let names: Vec<&str> = e.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["ft.a.1e-5", "ft.a.2e-5", "ft.b.1e-5", "ft.b.2e-5", "ft.c.1e-5", "ft.c.2e-5"]);
        assert_eq!(e[3].values["lr"].value, Value::Float(2e-5));
        assert_eq!(e[3].origin.values, [("mix".to_string(), "b".to_string()), ("lr".to_string(), "2e-5".to_string())]);
    }

    #[test]
    fn bad_matrices_are_refused_where_they_were_written() {
        let m = p(Value::Table(Default::default()));
        assert!(expand("ft", &m, &[]).unwrap_err().message.contains("`matrix` is empty"));
        let e = expand("ft", &m, &[("mix".into(), strings(&[]))]).unwrap_err();
        assert!(e.message.contains("has no values"), "{e}");
        let e = expand("ft", &m, &[("mix".into(), p(Value::String("a".into())))]).unwrap_err();
        assert!(e.message.contains("must be an array"), "{e}");
        let e = expand("ft", &m, &[("mix".into(), strings(&["a", "a"]))]).unwrap_err();
        assert!(e.message.contains("lists `a` twice"), "{e}");
        let e = expand("ft", &m, &[("mix".into(), strings(&["a/b", "a_b"]))]).unwrap_err();
        assert!(e.message.contains("same stage name `ft.a_b`"), "{e}");
        let e = expand("ft", &m, &[("x".into(), strings(&["a.b", "a"])), ("y".into(), strings(&["c", "b.c"]))])
            .unwrap_err();
        assert!(e.message.contains("same stage name `ft.a.b.c`"), "{e}");
    }

    #[test]
    fn globs_match_any_run_of_characters() {
        assert!(glob_match("ft.*", "ft.a.1e-5"));
        assert!(glob_match("ft.*.1e-5", "ft.b.1e-5"));
        assert!(!glob_match("ft.*.1e-5", "ft.b.2e-5"));
        assert!(!glob_match("ft.*", "ft"));
        assert!(glob_match("*", "read"));
        assert!(!glob_match("ft.a", "ft.a.1"));
    }
}

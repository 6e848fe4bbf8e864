//! `${vars.NAME}` and `${matrix.AXIS}` in a pipeline file's values.
//!
//! Interpolation runs on the values as written, before any stage kind reads them, so a stage
//! never knows a value came from a variable: it enters the stage key only through the parameter
//! it fills (a `--set` that feeds nothing a stage reads changes no key).
//!
//! The rules, DVC's where DVC has one:
//! - A string that is exactly one `${…}` takes the referenced value with its type
//!   (`lr = "${matrix.lr}"` is a float, `models = "${vars.models}"` an array).
//! - Inside a longer string a scalar is written out: strings as they are, integers in decimal,
//!   floats in their shortest form that reads back the same (`1e-5`, `0.25`), booleans as
//!   `true`/`false`. An array or table cannot be written into a string.
//! - Only the `vars.` and `matrix.` namespaces are ladle's: any other `${…}` (a shell's
//!   `${HOME}` in a command) is left as written, and `$${` writes a literal `${`.
//! - A misspelt name is an error at the value that uses it, with the nearest known name.

use std::collections::BTreeMap;

use super::params::closest;
use super::value::{Param, Value};
use crate::error::PipelineError;

/// The names a value may refer to.
pub struct Scope<'a> {
    /// `[vars]`, after `--set`.
    pub vars: &'a BTreeMap<String, Param>,
    /// The matrix combination of the stage being expanded (axis → value), if it has a matrix.
    pub matrix: Option<&'a BTreeMap<String, Param>>,
    /// The stage, for error messages (`None` in `[vars]` itself).
    pub stage: Option<&'a str>,
}

/// `param` with every `${vars.…}` and `${matrix.…}` in its strings (at any depth) replaced.
pub fn interpolate(param: &Param, scope: &Scope<'_>) -> Result<Param, PipelineError> {
    let value = match &param.value {
        Value::String(s) => return interpolate_string(s, param, scope),
        Value::Array(items) => Value::Array(items.iter().map(|p| interpolate(p, scope)).collect::<Result<_, _>>()?),
        Value::Table(entries) => Value::Table(
            entries
                .iter()
                .map(|(k, p)| Ok((k.clone(), interpolate(p, scope)?)))
                .collect::<Result<_, PipelineError>>()?,
        ),
        other => other.clone(),
    };
    Ok(Param { value, at: param.at.clone() })
}

/// Whether a string holds a reference ladle would replace (a matrix axis or a variable).
pub fn mentions(s: &str, namespace: &str) -> bool {
    pieces(s).iter().any(|p| matches!(p, Piece::Ref(ns, _) if *ns == namespace))
}

enum Piece<'s> {
    Text(&'s str),
    /// `${ns.name}` with ns `vars` or `matrix`.
    Ref(&'s str, &'s str),
    /// A `${` with no closing `}`.
    Unclosed,
}

fn pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if i > 0 && rest[..i].ends_with('$') {
            // `$${` is a literal `${`.
            out.push(Piece::Text(&rest[..i - 1]));
            out.push(Piece::Text("${"));
            rest = &rest[i + 2..];
            continue;
        }
        out.push(Piece::Text(&rest[..i]));
        let Some(end) = rest[i + 2..].find('}') else {
            out.push(Piece::Unclosed);
            return out;
        };
        let inner = &rest[i + 2..i + 2 + end];
        match inner.split_once('.') {
            Some((ns @ ("vars" | "matrix"), name)) => out.push(Piece::Ref(ns, name)),
            _ if inner == "vars" || inner == "matrix" => out.push(Piece::Ref(inner, "")),
            // Not ours (a shell variable): kept as written.
            _ => out.push(Piece::Text(&rest[i..i + 3 + end])),
        }
        rest = &rest[i + 3 + end..];
    }
    out.push(Piece::Text(rest));
    out
}

fn interpolate_string(s: &str, param: &Param, scope: &Scope<'_>) -> Result<Param, PipelineError> {
    let pieces = pieces(s);
    let error = |message: String, hint: Option<String>| PipelineError {
        location: param.at.clone(),
        stage: scope.stage.map(str::to_string),
        message,
        hint,
    };
    let lookup = |ns: &str, name: &str| -> Result<&Param, PipelineError> {
        let (table, what) = match ns {
            "vars" => (Some(scope.vars), "variable"),
            _ => (scope.matrix, "matrix axis"),
        };
        let Some(table) = table else {
            return Err(error(
                format!("`${{matrix.{name}}}` is used, but this stage has no `matrix`"),
                Some("`${matrix.AXIS}` belongs in a stage with matrix = { AXIS = [values] }".into()),
            ));
        };
        if name.is_empty() {
            return Err(error(format!("`${{{ns}}}` names no {what}: write `${{{ns}.NAME}}`"), None));
        }
        table.get(name).ok_or_else(|| {
            let known: Vec<&str> = table.keys().map(String::as_str).collect();
            let hint = match closest(name, known.iter().copied()) {
                Some(c) => format!("did you mean `${{{ns}.{c}}}`?"),
                None if known.is_empty() && ns == "vars" => {
                    "declare it in a [vars] table at the top of the file: [vars] NAME = VALUE".into()
                }
                None => format!("the {what}s here: {}", known.join(", ")),
            };
            error(format!("unknown {what} `{name}` in `${{{ns}.{name}}}`"), Some(hint))
        })
    };
    if let [Piece::Text(""), Piece::Ref(ns, name), Piece::Text("")] = pieces.as_slice() {
        let found = lookup(ns, name)?;
        return Ok(Param { value: found.value.clone(), at: param.at.clone() });
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Ref(..) | Piece::Unclosed)) {
        // Nothing of ours: the string as written (a `$${` among it still becomes `${`).
        let text: String = pieces.iter().map(|p| if let Piece::Text(t) = p { *t } else { "" }).collect();
        return Ok(Param { value: Value::String(text), at: param.at.clone() });
    }
    let mut out = String::new();
    for piece in &pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Unclosed => {
                return Err(error(
                    format!("`${{` is not closed in \"{s}\""),
                    Some("write `${vars.NAME}` or `${matrix.AXIS}`, or `$${` for a literal `${`".into()),
                ));
            }
            Piece::Ref(ns, name) => {
                let found = lookup(ns, name)?;
                match scalar_text(&found.value) {
                    Some(text) => out.push_str(&text),
                    None => {
                        return Err(error(
                            format!(
                                "`${{{ns}.{name}}}` is {} and cannot be written into a string",
                                found.value.type_name()
                            ),
                            Some(format!("use it as the whole value: \"${{{ns}.{name}}}\"")),
                        ));
                    }
                }
            }
        }
    }
    Ok(Param { value: Value::String(out), at: param.at.clone() })
}

/// How a scalar is written into a string (and into an expanded stage's name).
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) | Value::Datetime(s) => Some(s.clone()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Float(f) => Some(float_text(*f)),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(_) | Value::Table(_) => None,
    }
}

/// The shortest form of `f` that reads back the same: plain between 1e-3 and 1e6 (`0.25`,
/// `3.0`), scientific outside (`1e-5`, `2.5e7`), as people write learning rates and sizes.
pub fn float_text(f: f64) -> String {
    let magnitude = f.abs();
    if f == 0.0 || (1e-3..1e6).contains(&magnitude) || !f.is_finite() {
        let s = f.to_string();
        if f.is_finite() && !s.contains('.') { format!("{s}.0") } else { s }
    } else {
        format!("{f:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;

    fn at() -> Location {
        Location { file: "p.toml".into(), line: 3, column: 7 }
    }
    fn p(value: Value) -> Param {
        Param { value, at: at() }
    }
    fn s(text: &str) -> Param {
        p(Value::String(text.into()))
    }

    fn scope_with<'a>(vars: &'a BTreeMap<String, Param>, matrix: Option<&'a BTreeMap<String, Param>>) -> Scope<'a> {
        Scope { vars, matrix, stage: Some("ft") }
    }

    #[test]
    fn whole_references_keep_their_type_and_embedded_ones_are_written_out() {
        let vars = BTreeMap::from([
            ("lr".to_string(), p(Value::Float(1e-5))),
            ("mixes".to_string(), p(Value::Array(vec![s("a"), s("b")]))),
            ("name".to_string(), s("base")),
        ]);
        let matrix = BTreeMap::from([("mix".to_string(), s("a")), ("epochs".to_string(), p(Value::Integer(3)))]);
        let scope = scope_with(&vars, Some(&matrix));
        assert_eq!(interpolate(&s("${vars.lr}"), &scope).unwrap().value, Value::Float(1e-5));
        assert_eq!(interpolate(&s("${vars.mixes}"), &scope).unwrap().value, vars["mixes"].value);
        let text = interpolate(&s("train --lr ${vars.lr} --mix mix_${matrix.mix} -e ${matrix.epochs}"), &scope);
        assert_eq!(text.unwrap().value, Value::String("train --lr 1e-5 --mix mix_a -e 3".into()));
        // Inside arrays and tables too.
        let nested = p(Value::Array(vec![
            s("${vars.name}"),
            p(Value::Table(BTreeMap::from([("x".into(), s("${matrix.mix}"))]))),
        ]));
        let Value::Array(items) = interpolate(&nested, &scope).unwrap().value else { panic!() };
        assert_eq!(items[0].value, Value::String("base".into()));
        assert_eq!(items[1].value, Value::Table(BTreeMap::from([("x".into(), s("a"))])));
    }

    #[test]
    fn other_dollar_braces_stay_and_double_dollar_escapes() {
        let vars = BTreeMap::new();
        let scope = scope_with(&vars, None);
        assert_eq!(interpolate(&s("echo ${HOME} $x"), &scope).unwrap().value, Value::String("echo ${HOME} $x".into()));
        assert_eq!(interpolate(&s("$${vars.x}"), &scope).unwrap().value, Value::String("${vars.x}".into()));
    }

    #[test]
    fn mistakes_are_errors_at_the_value_with_a_suggestion() {
        let vars = BTreeMap::from([("learning_rate".to_string(), p(Value::Float(1e-5)))]);
        let arrays = BTreeMap::from([("mixes".to_string(), p(Value::Array(vec![])))]);
        let e = interpolate(&s("${vars.learning_rat}"), &scope_with(&vars, None)).unwrap_err();
        assert_eq!(e.location, at());
        assert!(e.message.contains("unknown variable `learning_rat`"), "{e}");
        assert!(e.hint.unwrap().contains("${vars.learning_rate}"));
        let e = interpolate(&s("x ${matrix.mix}"), &scope_with(&vars, None)).unwrap_err();
        assert!(e.message.contains("no `matrix`"), "{e}");
        let e = interpolate(&s("--mixes ${vars.mixes}"), &scope_with(&arrays, None)).unwrap_err();
        assert!(e.message.contains("an array and cannot be written into a string"), "{e}");
        let e = interpolate(&s("${vars.x"), &scope_with(&vars, None)).unwrap_err();
        assert!(e.message.contains("not closed"), "{e}");
    }

    #[test]
    fn floats_are_written_as_people_write_them() {
        for (f, want) in [
            (1e-5, "1e-5"),
            (2e-5, "2e-5"),
            (0.25, "0.25"),
            (3.0, "3.0"),
            (0.001, "0.001"),
            (2.5e7, "2.5e7"),
            (-1e-4, "-1e-4"),
        ] {
            assert_eq!(float_text(f), want);
            assert_eq!(float_text(f).parse::<f64>().unwrap(), f);
        }
    }
}

//! `ladle graph`: the DAG as Graphviz dot or Mermaid, in a deterministic order.
//!
//! The expansions of a matrix stage are drawn inside one box named after the declaration
//! (a dot `cluster`, a Mermaid `subgraph`), so a 3 × 2 sweep reads as one thing with six parts.

use std::collections::BTreeMap;
use std::fmt::Write;

use ladle_engine::Pipeline;

use super::GraphFormat;

pub fn render(p: &Pipeline, format: GraphFormat) -> String {
    let mut s = String::new();
    // Edges in stage order, then port name: stable across runs.
    let mut edges = Vec::new();
    for &i in &p.order {
        for (port, sources) in &p.stages[i].inputs {
            for &src in sources {
                edges.push((&p.stages[src].name, &p.stages[i].name, port));
            }
        }
    }
    // Matrix declarations and their expansions, in the order the first of each comes.
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut group_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut alone = Vec::new();
    for &i in &p.order {
        match &p.stages[i].matrix {
            Some(m) => {
                let g = *group_of.entry(m.declared.as_str()).or_insert_with(|| {
                    groups.push((m.declared.as_str(), Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push(i);
            }
            None => alone.push(i),
        }
    }
    let axes = |members: &[usize]| -> String {
        let names: Vec<&str> =
            p.stages[members[0]].matrix.iter().flat_map(|m| m.values.iter().map(|(axis, _)| axis.as_str())).collect();
        format!("matrix over {}: {} stages", names.join(" × "), members.len())
    };
    match format {
        GraphFormat::Dot => {
            let _ = writeln!(s, "digraph {:?} {{", p.name);
            let _ = writeln!(s, "  rankdir=LR;");
            let _ = writeln!(s, "  node [shape=box];");
            let node = |s: &mut String, indent: &str, i: usize| {
                let st = &p.stages[i];
                let _ = writeln!(s, "{indent}{:?} [label={:?}];", st.name, format!("{}\n{}", st.name, st.kind.name()));
            };
            for &i in &alone {
                node(&mut s, "  ", i);
            }
            for (declared, members) in &groups {
                let _ = writeln!(s, "  subgraph {:?} {{", format!("cluster_{declared}"));
                let _ = writeln!(s, "    label={:?};", format!("{declared} ({})", axes(members)));
                for &i in members {
                    node(&mut s, "    ", i);
                }
                let _ = writeln!(s, "  }}");
            }
            for (from, to, port) in edges {
                let _ = writeln!(s, "  {from:?} -> {to:?} [label={port:?}];");
            }
            let _ = writeln!(s, "}}");
        }
        GraphFormat::Mermaid => {
            let _ = writeln!(s, "flowchart LR");
            let node = |s: &mut String, indent: &str, i: usize| {
                let st = &p.stages[i];
                let _ = writeln!(s, "{indent}{}[\"{} ({})\"]", mermaid_id(&st.name), st.name, st.kind.name());
            };
            for &i in &alone {
                node(&mut s, "  ", i);
            }
            for (declared, members) in &groups {
                let _ = writeln!(
                    s,
                    "  subgraph {}[\"{declared} ({})\"]",
                    mermaid_id(&format!("matrix-{declared}")),
                    axes(members)
                );
                for &i in members {
                    node(&mut s, "    ", i);
                }
                let _ = writeln!(s, "  end");
            }
            for (from, to, port) in edges {
                let _ = writeln!(s, "  {} -->|{port}| {}", mermaid_id(from), mermaid_id(to));
            }
        }
    }
    s
}

/// A Mermaid node id for a stage name (Mermaid ids hold neither `-` nor `.`).
fn mermaid_id(name: &str) -> String {
    format!("s_{}", name.replace('-', "__").replace('.', "_o_"))
}

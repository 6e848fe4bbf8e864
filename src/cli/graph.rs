//! `ladle graph`: the DAG as Graphviz dot or Mermaid, in a deterministic order.

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
    match format {
        GraphFormat::Dot => {
            let _ = writeln!(s, "digraph {:?} {{", p.name);
            let _ = writeln!(s, "  rankdir=LR;");
            let _ = writeln!(s, "  node [shape=box];");
            for &i in &p.order {
                let st = &p.stages[i];
                let _ = writeln!(s, "  {:?} [label={:?}];", st.name, format!("{}\n{}", st.name, st.kind.name()));
            }
            for (from, to, port) in edges {
                let _ = writeln!(s, "  {from:?} -> {to:?} [label={port:?}];");
            }
            let _ = writeln!(s, "}}");
        }
        GraphFormat::Mermaid => {
            let _ = writeln!(s, "flowchart LR");
            for &i in &p.order {
                let st = &p.stages[i];
                let _ = writeln!(s, "  {}[\"{} ({})\"]", mermaid_id(&st.name), st.name, st.kind.name());
            }
            for (from, to, port) in edges {
                let _ = writeln!(s, "  {} -->|{port}| {}", mermaid_id(from), mermaid_id(to));
            }
        }
    }
    s
}

fn mermaid_id(name: &str) -> String {
    format!("s_{}", name.replace('-', "__"))
}

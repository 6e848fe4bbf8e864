//! `ladle show` and `ladle export`: a stage's current output, looked at or written out.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Result, bail};
use ladle_engine::records::{json_type, lines, parse_record};
use ladle_engine::{Artifact, Pipeline, Store};

fn current(
    p: &Pipeline,
    store: &Store,
    stage: &str,
) -> Result<(ladle_engine::StageKey, ladle_engine::ArtifactDigest, std::sync::Arc<Artifact>)> {
    let idx = p.stage_named(stage)?;
    match ladle_engine::plan::current_output(p, store, idx)? {
        Some(o) => Ok(o),
        None => bail!(
            "stage `{stage}` has no output for its current inputs and parameters\n  hint: run it first: ladle run {} --stage {stage}",
            p.path.display()
        ),
    }
}

/// `number`, `string`, ... (without the article `json_type` gives for sentences).
fn bare_type(v: &serde_json::Value) -> &'static str {
    let t = json_type(v);
    t.strip_prefix("an ").or_else(|| t.strip_prefix("a ")).unwrap_or(t)
}

pub fn show(p: &Pipeline, store: &Store, stage: &str, sample: usize, out: &mut impl Write) -> Result<()> {
    let (key, digest, artifact) = current(p, store, stage)?;
    writeln!(out, "stage:    {stage}")?;
    let decl = &p.stages[p.stage_named(stage)?];
    writeln!(out, "kind:     {}", decl.kind.name())?;
    if let Some(m) = &decl.matrix {
        let values: Vec<String> = m.values.iter().map(|(axis, v)| format!("{axis} = {v}")).collect();
        writeln!(out, "matrix:   {} (of `{}`)", values.join(", "), m.declared)?;
    }
    writeln!(out, "output:   {} ({})", digest, artifact.kind_name())?;
    match &*artifact {
        Artifact::Dataset { shards, .. } => {
            let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
            writeln!(
                out,
                "records:  {} in {} shard(s), {}",
                artifact.records().unwrap_or(0),
                shards.len(),
                super::human_bytes(bytes)
            )?;
            // Schema: field → JSON types seen, over the first shard.
            let mut schema: BTreeMap<String, std::collections::BTreeSet<&'static str>> = BTreeMap::new();
            let mut examples = Vec::new();
            if let Some(first) = shards.first() {
                let bytes = store.get(&first.digest)?;
                for line in lines(&bytes) {
                    let r = parse_record(line).map_err(anyhow::Error::msg)?;
                    for (k, v) in &r {
                        schema.entry(k.clone()).or_default().insert(bare_type(v));
                    }
                    if examples.len() < sample {
                        examples.push(r);
                    }
                }
            }
            writeln!(out, "schema:   (from the first shard)")?;
            for (k, types) in &schema {
                writeln!(out, "  {k}: {}", types.iter().copied().collect::<Vec<_>>().join(" | "))?;
            }
            if !examples.is_empty() {
                writeln!(out, "sample:")?;
                for r in examples {
                    writeln!(out, "  {}", serde_json::to_string(&r)?)?;
                }
            }
        }
        Artifact::Folder { files, external, metrics, .. } => {
            if let Some(root) = external {
                writeln!(out, "folder:   {}", root.display())?;
            }
            writeln!(out, "files:    {}", files.len())?;
            for f in files {
                writeln!(out, "  {:<40} {:>10}  {}", f.path, super::human_bytes(f.size), f.digest.short())?;
            }
            if let Some(m) = metrics {
                writeln!(out, "metrics:  {}", serde_json::to_string(m)?)?;
            }
        }
        Artifact::Chosen { items } => {
            writeln!(out, "chosen:   {} artifact(s)", items.len())?;
            for item in items {
                let metrics = item.metrics().map(|m| format!("  {m}")).unwrap_or_default();
                writeln!(out, "  {:<8} {}{metrics}", item.kind_name(), item.digest().short())?;
            }
        }
        Artifact::Tensors { shards } => {
            let bytes: u64 = shards.iter().map(|s| s.bytes).sum();
            let rows = artifact.records().unwrap_or(0);
            writeln!(out, "rows:     {rows} in {} shard(s), {}", shards.len(), super::human_bytes(bytes))?;
            if let Some(first) = shards.first() {
                writeln!(out, "tensors:  (per shard; the first has {} rows)", first.records)?;
                for t in ladle_stages::tensors::describe(&store.get(&first.digest)?)? {
                    let dims = t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
                    writeln!(out, "  {}: {} [{dims}]", t.name, t.dtype.to_lowercase())?;
                }
            }
        }
        Artifact::File { path, size, records, .. } => {
            writeln!(out, "file:     {} ({}, {records} records)", path.display(), super::human_bytes(*size))?;
        }
        Artifact::Metrics { value } => writeln!(out, "metrics:  {}", serde_json::to_string_pretty(value)?)?,
    }
    if let Some(log) = store.get_log(&key)? {
        writeln!(out, "log:")?;
        for line in String::from_utf8_lossy(&log).lines() {
            writeln!(out, "  | {line}")?;
        }
    }
    // The logs of the Slurm array tasks that computed its shards, kept with its key.
    let logs = ladle_engine::executor::task::StageDir::new(store, &key).root.join("logs");
    let mut tasks: Vec<_> = std::fs::read_dir(&logs).into_iter().flatten().flatten().map(|e| e.path()).collect();
    if !tasks.is_empty() {
        tasks.sort();
        writeln!(out, "slurm:    {} task log(s) in {}", tasks.len(), logs.display())?;
        if let Some(last) = tasks.last() {
            writeln!(out, "  the end of {}:", last.file_name().unwrap_or_default().to_string_lossy())?;
            for line in ladle_engine::executor::task::log_tail(last, 5).lines() {
                writeln!(out, "  | {line}")?;
            }
        }
    }
    Ok(())
}

/// Writes the stage's output to `dest`; returns a short description of what was written.
pub fn export(p: &Pipeline, store: &Store, stage: &str, dest: &Path) -> Result<String> {
    let (_, _, artifact) = current(p, store, stage)?;
    match &*artifact {
        Artifact::Dataset { shards, root } => {
            let ext = dest.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            match ext.as_str() {
                "jsonl" | "ndjson" => {
                    let mut f = std::io::BufWriter::new(std::fs::File::create(dest)?);
                    for s in shards {
                        f.write_all(&store.get(&s.digest)?)?;
                    }
                    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                }
                "parquet" => {
                    ladle_stages::parquet_io::write_from_store(
                        store,
                        shards,
                        root.as_ref().map(|r| p.dir.join(r)).as_deref(),
                        dest,
                    )?;
                }
                _ => bail!(
                    "cannot tell the format of {} from its extension\n  hint: name it .jsonl or .parquet",
                    dest.display()
                ),
            }
            Ok(format!("{} records", artifact.records().unwrap_or(0)))
        }
        Artifact::Folder { files, external, .. } => {
            std::fs::create_dir_all(dest)?;
            for f in files {
                let target = dest.join(&f.path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match external {
                    Some(root) => {
                        std::fs::copy(root.join(&f.path), &target)?;
                    }
                    None => std::fs::write(&target, store.get(&f.digest)?)?,
                }
            }
            Ok(format!("{} files", files.len()))
        }
        Artifact::Tensors { shards } => Ok(ladle_stages::tensors::export(|s| Ok(store.get(&s.digest)?), shards, dest)?),
        Artifact::File { path, .. } => {
            std::fs::copy(path, dest)?;
            Ok("1 file".into())
        }
        Artifact::Metrics { value } => {
            std::fs::write(dest, serde_json::to_vec_pretty(value)?)?;
            Ok("metrics".into())
        }
        Artifact::Chosen { items } => bail!(
            "`{stage}` is a chosen set of {} artifact(s), not one thing to export\n  hint: export the stages it chose from (`ladle show {} {stage}` lists them)",
            items.len(),
            p.path.display()
        ),
    }
}

/// `ladle show --hist COLUMN`: the column's histogram in text, with the cut of a `select` that
/// reads the stage's output by it (the same bins and cut as `ladle report`).
pub fn histogram(p: &Pipeline, store: &Store, stage: &str, column: &str, out: &mut impl Write) -> Result<()> {
    let (_, _, artifact) = current(p, store, stage)?;
    let idx = p.stage_named(stage)?;
    // The report's view of the stages (from the latest run), with this stage's current output.
    let run = ladle_report::runs_of(p, store)?.pop().unwrap_or_else(|| ladle_report::empty_run(p));
    let mut views = ladle_report::stage_views(p, store, &run);
    let at = views.iter().position(|v| v.index == idx).expect("a stage of the pipeline");
    views[at].artifact = Some(artifact);
    let view = &views[at];
    let options = ladle_report::Options::default();
    let panel = ladle_report::columns::panel(p, store, &views, view, column, &options);
    if let Some(note) = &panel.note {
        bail!("{note}\n  hint: `ladle show {} {stage}` lists its columns and their types", p.path.display());
    }
    let h = panel.histogram.as_ref().expect("a panel without a note has a histogram");
    write!(out, "{}", ladle_report::histogram::text(h, panel.cuts.first(), 50))?;
    if panel.missing > 0 {
        writeln!(out, "{} record(s) without `{column}`", panel.missing)?;
    }
    for (t, n) in &panel.not_numbers {
        writeln!(out, "{n} record(s) with {t} in `{column}`")?;
    }
    Ok(())
}

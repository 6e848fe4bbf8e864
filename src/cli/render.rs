//! Renderings of the run's event stream: progress bars on a terminal, plain lines otherwise, JSON
//! lines with `--json`. All three read the same events; none of them decides anything.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ladle_engine::events::{Event, EventSink};
use ladle_engine::runs::{RunRecord, RunStatus, StageStatus};

pub fn sink(json: bool) -> Arc<dyn EventSink> {
    if json {
        Arc::new(JsonLines)
    } else if std::io::stderr().is_terminal() {
        Arc::new(Bars::default())
    } else {
        Arc::new(Plain)
    }
}

/// One JSON object per event on stdout.
struct JsonLines;

impl EventSink for JsonLines {
    fn emit(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

fn records(n: Option<u64>) -> String {
    n.map(|n| format!(", {n} records")).unwrap_or_default()
}

/// A line per stage event, on stderr (for logs and CI).
struct Plain;

fn line_for(event: &Event) -> Option<String> {
    Some(match event {
        Event::RunStarted { run, pipeline, stages } => format!("run {run} of `{pipeline}`: {} stage(s)", stages.len()),
        Event::StageStarted { stage, kind, shards_total } => match shards_total {
            Some(n) => format!("{stage}: {kind} started, {n} shard(s)"),
            None => format!("{stage}: {kind} started"),
        },
        Event::StageCached { stage, artifact, records: n, .. } => {
            format!("{stage}: cached ({}{})", &artifact[..12], records(*n))
        }
        Event::StageFinished {
            stage,
            artifact,
            records: n,
            shards_total,
            shards_computed,
            work_unit,
            dropped_on_error,
            unchanged,
            seconds,
            ..
        } => {
            let dropped =
                if *dropped_on_error > 0 { format!(", {dropped_on_error} dropped on error") } else { String::new() };
            let shards = if *shards_total > 0 {
                format!(", {shards_computed}/{shards_total} {} computed", work_unit.unwrap_or("shard(s)"))
            } else {
                String::new()
            };
            let same = if *unchanged { ", output unchanged" } else { "" };
            format!("{stage}: done in {seconds:.2} s ({}{}{shards}{dropped}{same})", &artifact[..12], records(*n))
        }
        Event::StageFailed { stage, error, .. } => format!("{stage}: FAILED: {error}"),
        Event::StageSkipped { stage, reason, .. } => format!("{stage}: skipped, {reason}"),
        Event::Summary(r) => summary_line(r),
        Event::JobSubmitted { stage, job, shards: 0, .. } => format!("{stage}: submitted Slurm job {job}"),
        Event::JobSubmitted { stage, job, tasks, shards } => {
            format!("{stage}: submitted Slurm job {job}: {tasks} task(s), {shards} shard(s)")
        }
        Event::JobAdopted { stage, jobs, tasks } => {
            format!(
                "{stage}: waiting again for {tasks} task(s) of Slurm job(s) {} still queued or running",
                jobs.join(", ")
            )
        }
        Event::ShardDone { .. } | Event::Progress { .. } => return None,
    })
}

fn summary_line(r: &RunRecord) -> String {
    let count = |s| r.stages.iter().filter(|x| x.status == s).count();
    let verdict = if r.status == RunStatus::Ok { "ok" } else { "failed" };
    format!(
        "{verdict}: {} stage(s): {} ran, {} cached, {} failed, {} skipped in {:.2} s",
        r.stages.len(),
        count(StageStatus::Ran),
        count(StageStatus::Cached),
        count(StageStatus::Failed),
        count(StageStatus::Skipped),
        r.seconds.unwrap_or(0.0)
    )
}

impl EventSink for Plain {
    fn emit(&self, event: &Event) {
        if let Some(line) = line_for(event) {
            eprintln!("{line}");
        }
    }
}

/// Progress bars, one per running stage.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn bar(&self, stage: &str, total: Option<u64>) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        bars.entry(stage.to_string())
            .or_insert_with(|| {
                self.multi.set_draw_target(ProgressDrawTarget::stderr());
                let bar = self.multi.add(ProgressBar::new(total.unwrap_or(0)));
                let style = ProgressStyle::with_template("{prefix:>16.bold} {bar:30.cyan/blue} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_prefix(stage.to_string());
                bar
            })
            .clone()
    }
}

impl EventSink for Bars {
    fn emit(&self, event: &Event) {
        match event {
            Event::StageStarted { stage, shards_total, .. } => {
                let bar = self.bar(stage, *shards_total);
                bar.set_message(if shards_total.is_some() { "shards" } else { "" });
            }
            Event::ShardDone { stage, done, total, .. } | Event::Progress { stage, done, total } => {
                let bar = self.bar(stage, Some(*total));
                bar.set_length(*total);
                bar.set_position(*done);
            }
            Event::StageCached { stage, .. }
            | Event::StageFinished { stage, .. }
            | Event::StageFailed { stage, .. }
            | Event::StageSkipped { stage, .. } => {
                let bar = self.bars.lock().unwrap_or_else(|p| p.into_inner()).remove(stage);
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                if let Some(line) = line_for(event) {
                    let _ = self.multi.println(line);
                }
            }
            Event::RunStarted { .. } | Event::Summary(_) | Event::JobSubmitted { .. } | Event::JobAdopted { .. } => {
                if let Some(line) = line_for(event) {
                    let _ = self.multi.println(line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(work_unit: Option<&'static str>) -> Event {
        Event::StageFinished {
            stage: "soup".into(),
            kind: "soup".into(),
            artifact: "0123456789abcdef".into(),
            records: None,
            shards_total: 9,
            shards_computed: 2,
            work_unit,
            dropped_on_error: 0,
            unchanged: false,
            seconds: 1.5,
        }
    }

    #[test]
    fn a_stage_finished_line_names_what_was_computed() {
        assert_eq!(line_for(&finished(None)).unwrap(), "soup: done in 1.50 s (0123456789ab, 2/9 shard(s) computed)");
        assert_eq!(
            line_for(&finished(Some("candidate score(s)"))).unwrap(),
            "soup: done in 1.50 s (0123456789ab, 2/9 candidate score(s) computed)"
        );
    }
}

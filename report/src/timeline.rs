//! The run's timeline: every computed shard (and every whole stage) as a bar from when it started
//! to when it ended, on the work slots it ran on. The run records when each stage started and
//! when each computed shard began and ended; slots are not recorded, so bars are put on lanes
//! the way a scheduler with that many slots could have run them (each on the first lane free at
//! its start), which gives as many lanes as there were slots busy at once.

use std::fmt::Write as _;

use ladle_engine::runs::{RunRecord, StageStatus};

use crate::dag::seconds;
use crate::histogram::escape;

/// A bar: a stage's shard (or the whole stage), in milliseconds since the run started.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub stage: usize,
    pub shard: Option<usize>,
    pub start_ms: u64,
    pub end_ms: u64,
}

const PALETTE: [&str; 10] =
    ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac"];

/// The spans of a run, in start order, with their lanes.
pub fn spans(run: &RunRecord) -> Vec<(Span, usize)> {
    let mut spans = Vec::new();
    for (i, s) in run.stages.iter().enumerate() {
        if !s.shard_times.is_empty() {
            spans.extend(s.shard_times.iter().map(|t| Span {
                stage: i,
                shard: Some(t.shard),
                start_ms: t.start_ms,
                end_ms: t.end_ms.max(t.start_ms + 1),
            }));
        } else if s.status == StageStatus::Ran
            && let (Some(start), Some(secs)) = (s.started_ms, s.seconds)
        {
            spans.push(Span {
                stage: i,
                shard: None,
                start_ms: start,
                end_ms: start + ((secs * 1000.0) as u64).max(1),
            });
        }
    }
    spans.sort_by_key(|s| (s.start_ms, s.end_ms));
    let mut lanes: Vec<u64> = Vec::new();
    spans
        .into_iter()
        .map(|s| {
            let lane = match lanes.iter().position(|&end| end <= s.start_ms) {
                Some(l) => l,
                None => {
                    lanes.push(0);
                    lanes.len() - 1
                }
            };
            lanes[lane] = s.end_ms;
            (s, lane)
        })
        .collect()
}

/// The timeline as SVG (`None` when nothing computed in the run).
pub fn svg(run: &RunRecord) -> Option<String> {
    let spans = spans(run);
    if spans.is_empty() {
        return None;
    }
    let lanes = spans.iter().map(|(_, l)| l + 1).max().unwrap_or(1);
    let end = spans.iter().map(|(s, _)| s.end_ms).max().unwrap_or(1).max(1) as f64;
    let (left, width, lane_h, top) = (60.0, 900.0, 16.0, 10.0);
    let stages: Vec<usize> = {
        let mut v: Vec<usize> = spans.iter().map(|(s, _)| s.stage).collect();
        v.sort();
        v.dedup();
        v
    };
    let legend_h = 18.0 * stages.len().div_ceil(5) as f64;
    let height = top + lane_h * lanes as f64 + 30.0 + legend_h;
    let total = left + width + 20.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="timeline" viewBox="0 0 {total} {height}" width="{total}" height="{height}" font-family="sans-serif" font-size="11"><rect width="{total}" height="{height}" fill="white"/>"#
    );
    for l in 0..lanes {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">slot {}</text>"#,
            left - 6.0,
            top + lane_h * (l as f64 + 0.75),
            l + 1
        );
    }
    for (span, lane) in &spans {
        let color = PALETTE[stages.iter().position(|&x| x == span.stage).unwrap_or(0) % PALETTE.len()];
        let x = left + width * span.start_ms as f64 / end;
        let w = (width * (span.end_ms - span.start_ms) as f64 / end).max(0.5);
        let name = &run.stages[span.stage].stage;
        let what = match span.shard {
            Some(i) => format!("{name} · shard {i}"),
            None => name.clone(),
        };
        let _ = write!(
            s,
            r#"<rect class="span" x="{x:.2}" y="{:.1}" width="{w:.2}" height="{:.1}" fill="{color}"><title>{}: {} – {}</title></rect>"#,
            top + lane_h * *lane as f64 + 1.0,
            lane_h - 2.0,
            escape(&what),
            seconds(span.start_ms as f64 / 1000.0),
            seconds(span.end_ms as f64 / 1000.0)
        );
    }
    let axis_y = top + lane_h * lanes as f64 + 4.0;
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333"/><text x="{left}" y="{:.1}">0</text><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
        left + width,
        axis_y + 14.0,
        left + width,
        axis_y + 14.0,
        seconds(end / 1000.0)
    );
    for (k, &st) in stages.iter().enumerate() {
        let (x, y) = (left + 180.0 * (k % 5) as f64, axis_y + 30.0 + 18.0 * (k / 5) as f64);
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 9.0,
            PALETTE[k % PALETTE.len()],
            x + 14.0,
            escape(&run.stages[st].stage)
        );
    }
    s.push_str("</svg>");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ladle_engine::runs::{RunStatus, ShardTime, StageRecord};

    fn stage(name: &str, times: &[(u64, u64)]) -> StageRecord {
        StageRecord {
            stage: name.into(),
            kind: "perplexity".into(),
            status: StageStatus::Ran,
            shards_total: times.len() as u64,
            shards_computed: times.len() as u64,
            work_unit: None,
            records: None,
            dropped_on_error: 0,
            artifact: None,
            seconds: Some(1.0),
            error: None,
            jobs: Vec::new(),
            started_ms: Some(0),
            shard_times: times
                .iter()
                .enumerate()
                .map(|(i, &(a, b))| ShardTime { shard: i, start_ms: a, end_ms: b })
                .collect(),
        }
    }

    #[test]
    fn spans_take_the_first_free_lane_so_lanes_are_the_slots_busy_at_once() {
        let run = RunRecord {
            id: 1,
            pipeline: "p".into(),
            pipeline_file: "p.toml".into(),
            started_unix: 0,
            status: RunStatus::Ok,
            seconds: Some(1.0),
            peak_rss_bytes: None,
            stages: vec![stage("a", &[(0, 100), (0, 50), (50, 120), (100, 200)])],
        };
        let lanes: Vec<usize> = spans(&run).iter().map(|(_, l)| *l).collect();
        // (0,50)→0, (0,100)→1, (50,120)→0, (100,200)→1: two slots were busy at once.
        assert_eq!(lanes, vec![0, 1, 0, 1]);
        assert!(svg(&run).unwrap().matches("class=\"span\"").count() == 4);
    }
}

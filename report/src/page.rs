//! The report's HTML: one file, inline CSS and SVG, thumbnails as `data:` URIs, no script, so it
//! opens offline anywhere and can be attached to a paper or a pull request as it is.

use std::fmt::Write as _;

use ladle_engine::Pipeline;
use ladle_engine::runs::{RunRecord, RunStatus, StageStatus};

use crate::StageView;
use crate::columns::{Panel as ColumnPanel, Shown};
use crate::dag::seconds;
use crate::histogram::{escape, short};
use crate::soup::Panel as SoupPanel;

const STYLE: &str = "body{font-family:sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}\
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}\
h3{font-size:1em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;\
text-align:left;vertical-align:top;font-size:.9em}th{background:#f5f5f5}td.num{text-align:right;\
font-variant-numeric:tabular-nums}.note{color:#8a6d3b;background:#fcf8e3;padding:.4em .8em;border-radius:4px}\
.meta{color:#555}.ends{display:flex;gap:1.5em;flex-wrap:wrap}.ends>div{flex:1;min-width:420px}\
img.thumb{max-width:96px;max-height:96px}svg{max-width:100%;height:auto}";

/// A Unix time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc(unix: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm).
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

fn status_word(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Ok => "ok",
        RunStatus::Failed => "failed",
        RunStatus::Running => "interrupted",
    }
}

/// What a page shows, made by the other modules.
pub struct Parts<'a> {
    pub dag: &'a str,
    pub timeline: Option<&'a str>,
    pub columns: &'a [ColumnPanel],
    pub soups: &'a [SoupPanel],
    pub metrics: &'a crate::metrics::Panel,
}

pub fn html(
    pipeline: &Pipeline,
    run: &RunRecord,
    runs: &[RunRecord],
    stages: &[StageView<'_>],
    parts: &Parts<'_>,
) -> String {
    let Parts { dag, timeline, columns, soups, metrics } = *parts;
    let mut h = String::new();
    let title = format!("{} — run {}", pipeline.name, run.id);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(&title)
    );
    let _ = write!(h, "<h1>{}</h1>", escape(&title));
    let _ = write!(
        h,
        "<p class=\"meta\">{} · started {} · {}{}{}</p>",
        escape(&pipeline.path.display().to_string()),
        utc(run.started_unix),
        status_word(run.status),
        run.seconds.map(|s| format!(" in {}", seconds(s))).unwrap_or_default(),
        run.peak_rss_bytes.map(|b| format!(" · peak memory {:.0} MiB", b as f64 / 1048576.0)).unwrap_or_default()
    );
    if run.status == RunStatus::Failed {
        for s in run.stages.iter().filter(|s| s.status == StageStatus::Failed) {
            let _ = write!(
                h,
                "<p class=\"note\">stage <b>{}</b> failed: {}</p>",
                escape(&s.stage),
                escape(s.error.as_deref().unwrap_or("(no message)"))
            );
        }
    }

    h.push_str("<h2 id=\"graph\">Stages</h2>");
    h.push_str(dag);
    h.push_str("<table class=\"stages\"><tr><th>stage</th><th>kind</th><th>status</th><th>time</th><th>records in → out</th><th>computed</th></tr>");
    for v in stages {
        let (_, status) = crate::dag::status_style(v.record);
        let r = v.record;
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{status}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(v.name),
            v.kind,
            r.and_then(|r| r.seconds).map(seconds).unwrap_or_default(),
            match (crate::records_in(pipeline, stages, v), r.and_then(|r| r.records)) {
                (Some(i), Some(o)) => format!("{i} → {o}"),
                (None, Some(o)) => o.to_string(),
                _ => String::new(),
            },
            r.filter(|r| r.shards_total > 0)
                .map(|r| format!(
                    "{}/{} {}",
                    r.shards_computed,
                    r.shards_total,
                    r.work_unit.as_deref().unwrap_or("shards")
                ))
                .unwrap_or_default()
        );
    }
    h.push_str("</table>");

    h.push_str("<h2 id=\"timeline\">Timeline</h2>");
    match timeline {
        Some(svg) => h.push_str(svg),
        None => h.push_str("<p class=\"note\">Nothing was computed in this run: every stage was cached.</p>"),
    }

    h.push_str("<h2 id=\"columns\">Columns</h2>");
    if columns.is_empty() {
        h.push_str("<p class=\"note\">No stage of this run added a numeric column to its records.</p>");
    }
    for p in columns {
        let _ = write!(
            h,
            "<section class=\"column\" data-stage=\"{}\" data-column=\"{}\">",
            escape(&p.stage),
            escape(&p.column)
        );
        let _ = write!(h, "<h3>{} · <code>{}</code></h3>", escape(&p.stage), escape(&p.column));
        if let Some(note) = &p.note {
            let _ = write!(h, "<p class=\"note\">{}</p>", escape(note));
        }
        if let Some(svg) = &p.svg {
            h.push_str(svg);
        }
        if let Some(hist) = &p.histogram {
            let n: u64 = hist.counts.iter().sum();
            let mut extra = String::new();
            if p.missing > 0 {
                let _ = write!(extra, "; {} without it", p.missing);
            }
            for (t, c) in &p.not_numbers {
                let _ = write!(extra, "; {c} holding {t}");
            }
            let _ = write!(h, "<p class=\"meta\">{n} values from {} to {}{extra}.</p>", short(hist.lo), short(hist.hi));
            for c in &p.cuts[1.min(p.cuts.len())..] {
                let _ = write!(h, "<p class=\"meta\">also cut at {}</p>", escape(&c.label));
            }
        }
        if !p.lowest.is_empty() {
            h.push_str("<div class=\"ends\">");
            ends(&mut h, "lowest", &p.column, &p.lowest);
            ends(&mut h, "highest", &p.column, &p.highest);
            h.push_str("</div>");
        }
        h.push_str("</section>");
    }

    if !metrics.rows.is_empty() {
        h.push_str("<h2 id=\"metrics\">Metrics</h2>");
        h.push_str("<table class=\"metrics\"><tr><th>stage</th><th>metrics</th><th>chosen</th></tr>");
        for r in &metrics.rows {
            let values: Vec<String> = r
                .values
                .iter()
                .map(|(k, v)| format!("{k} = {}", v.as_f64().map(short).unwrap_or_else(|| v.to_string())))
                .collect();
            let chosen = if !r.chosen_by.is_empty() {
                format!("kept by {}", r.chosen_by.join(", "))
            } else if r.passed_over {
                "not kept".into()
            } else {
                String::new()
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.stage),
                escape(&values.join(", ")),
                escape(&chosen)
            );
        }
        h.push_str("</table>");
        for c in &metrics.charts {
            h.push_str(&c.svg);
        }
    }

    if !soups.is_empty() {
        h.push_str("<h2 id=\"soups\">Soups</h2>");
    }
    for s in soups {
        let _ = write!(h, "<section class=\"soup\" data-stage=\"{}\"><h3>{}</h3>", escape(&s.stage), escape(&s.stage));
        if let Some(note) = &s.note {
            let _ = write!(h, "<p class=\"note\">{}</p>", escape(note));
        }
        let name = |i: usize| s.names.get(i).cloned().unwrap_or_else(|| format!("model {i}"));
        if let Some(summary) = &s.summary {
            let _ = write!(h, "<p class=\"meta\">method: {}</p>", escape(summary["method"].as_str().unwrap_or("?")));
            h.push_str(
                "<table class=\"ingredients\"><tr><th>#</th><th>ingredient</th><th>metric</th><th>weight</th></tr>",
            );
            for (i, ing) in summary["ingredients"].as_array().into_iter().flatten().enumerate() {
                let _ = write!(
                    h,
                    "<tr><td class=\"num\">{i}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    escape(&name(i)),
                    ing["metric"].as_f64().map(|m| format!("{m:.6}")).unwrap_or_default(),
                    ing["weight"].as_f64().map(short).unwrap_or_default()
                );
            }
            h.push_str("</table>");
        }
        if !s.tries.is_empty() {
            h.push_str("<table class=\"trace\"><tr><th>try</th><th>ingredient</th><th>pool</th><th>score</th><th>kept</th></tr>");
            for (i, t) in s.tries.iter().enumerate() {
                let pool: Vec<String> = t.pool.iter().map(|&p| name(p)).collect();
                let _ = write!(
                    h,
                    "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.6}</td><td>{}</td></tr>",
                    i + 1,
                    escape(&name(t.ingredient)),
                    escape(&pool.join(" + ")),
                    t.score,
                    if t.kept { "kept" } else { "rejected" }
                );
            }
            h.push_str("</table>");
        }
        if let Some(svg) = &s.svg {
            h.push_str(svg);
        }
        h.push_str("</section>");
    }

    h.push_str("<h2 id=\"history\">Runs</h2><table class=\"history\"><tr><th>run</th><th>started</th><th>status</th><th>time</th><th>stages ran / cached / failed</th><th>shards computed</th></tr>");
    for r in runs.iter().rev() {
        let count = |st: StageStatus| r.stages.iter().filter(|s| s.status == st).count();
        let computed: u64 = r.stages.iter().filter(|s| s.work_unit.is_none()).map(|s| s.shards_computed).sum();
        let _ = write!(
            h,
            "<tr{}><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} / {} / {}</td><td class=\"num\">{computed}</td></tr>",
            if r.id == run.id { " style=\"font-weight:bold\"" } else { "" },
            r.id,
            utc(r.started_unix),
            status_word(r.status),
            r.seconds.map(seconds).unwrap_or_default(),
            count(StageStatus::Ran),
            count(StageStatus::Cached),
            count(StageStatus::Failed)
        );
    }
    h.push_str("</table><p class=\"meta\">Made by ladle report from the store and run records.</p></body></html>\n");
    h
}

fn ends(h: &mut String, which: &str, column: &str, rows: &[Shown]) {
    let _ = write!(
        h,
        "<div><h4>{} {which}</h4><table class=\"{which}\"><tr><th>{}</th><th>#</th><th></th><th>text</th></tr>",
        rows.len(),
        escape(column)
    );
    for r in rows {
        let img =
            r.thumbnail.as_ref().map(|t| format!("<img class=\"thumb\" alt=\"\" src=\"{t}\">")).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{img}</td><td>{}</td></tr>",
            short(r.value),
            r.position,
            escape(&r.text)
        );
    }
    h.push_str("</table></div>");
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_times_are_utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc(1_796_136_849), "2026-12-01 14:54 UTC"); // as GNU `date -u -d @1796136849`
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00 UTC");
    }
}

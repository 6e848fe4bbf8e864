//! The pipeline's DAG, laid out by `layout-rs` (a Sugiyama-style layered layout in Rust, no
//! graphviz) and drawn as SVG: one box (a `<g class="node">`) per stage, coloured by what the run
//! did with it, with its time, records in → out and shards; arrows for the data flowing.
//!
//! The layout crate places the boxes and routes the edges; the drawing is ours, so each box
//! carries the stage's name as data and the report's own styling.

use std::fmt::Write as _;

use ladle_engine::Pipeline;
use ladle_engine::runs::StageStatus;
use layout::core::base::Orientation;
use layout::core::format::{ClipHandle, RenderBackend};
use layout::core::geometry::Point;
use layout::core::style::StyleAttr;
use layout::std_shapes::shapes::{Arrow, Element, ShapeKind};
use layout::topo::layout::VisualGraph;

use crate::StageView;
use crate::histogram::escape;

/// A stage's status colour (fill) and word.
pub fn status_style(record: Option<&ladle_engine::runs::StageRecord>) -> (&'static str, &'static str) {
    match record.map(|r| r.status) {
        Some(StageStatus::Ran) => ("#c7e9c0", "ran"),
        Some(StageStatus::Cached) => ("#deebf7", "cached"),
        Some(StageStatus::Failed) => ("#fcbba1", "failed"),
        Some(StageStatus::Skipped) => ("#f0f0f0", "skipped"),
        None => ("#ffffff", "not in this run"),
    }
}

/// The lines of a stage's box.
fn label(pipeline: &Pipeline, stages: &[StageView<'_>], view: &StageView<'_>) -> Vec<String> {
    let (_, status) = status_style(view.record);
    let mut lines = vec![view.name.to_string(), format!("{} · {status}", view.kind)];
    if let Some(r) = view.record {
        if let Some(s) = r.seconds {
            lines[1] += &format!(" · {}", seconds(s));
        }
        let records_in = crate::records_in(pipeline, stages, view);
        match (records_in, r.records) {
            (Some(i), Some(o)) => lines.push(format!("{i} → {o} records")),
            (None, Some(o)) => lines.push(format!("{o} records")),
            _ => {}
        }
        if r.shards_total > 0 {
            let unit = r.work_unit.as_deref().unwrap_or("shards");
            lines.push(format!("{}/{} {unit} computed", r.shards_computed, r.shards_total));
        }
    }
    lines
}

pub fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} min", s / 60.0)
    }
}

/// Collects the edges the layout routes; boxes and labels are drawn from the positions.
#[derive(Default)]
struct Edges {
    paths: Vec<String>,
    min: (f64, f64),
    max: (f64, f64),
}

impl Edges {
    fn grow(&mut self, p: Point) {
        self.min = (self.min.0.min(p.x), self.min.1.min(p.y));
        self.max = (self.max.0.max(p.x), self.max.1.max(p.y));
    }
}

impl RenderBackend for Edges {
    fn draw_rect(&mut self, _: Point, _: Point, _: &StyleAttr, _: Option<String>, _: Option<ClipHandle>) {}
    fn draw_line(&mut self, _: Point, _: Point, _: &StyleAttr, _: Option<String>) {}
    fn draw_circle(&mut self, _: Point, _: Point, _: &StyleAttr, _: Option<String>) {}
    fn draw_text(&mut self, _: Point, _: &str, _: &StyleAttr) {}
    fn draw_arrow(
        &mut self,
        path: &[(Point, Point)],
        _: bool,
        _: (bool, bool),
        _: &StyleAttr,
        _: Option<String>,
        _: &str,
    ) {
        if path.len() < 2 {
            return;
        }
        for p in path {
            self.grow(p.0);
            self.grow(p.1);
        }
        // The curve as the layout crate's own SVG writer draws it: M, C, then S per point.
        let mut d = format!(
            "M {:.1} {:.1} C {:.1} {:.1}, {:.1} {:.1}, {:.1} {:.1}",
            path[0].0.x, path[0].0.y, path[0].1.x, path[0].1.y, path[1].0.x, path[1].0.y, path[1].1.x, path[1].1.y
        );
        for p in &path[2..] {
            let _ = write!(d, " S {:.1} {:.1}, {:.1} {:.1}", p.0.x, p.0.y, p.1.x, p.1.y);
        }
        self.paths.push(d);
    }
    fn create_clip(&mut self, _: Point, _: Point, _: usize) -> ClipHandle {
        0
    }
}

const FONT: f64 = 12.0;
const LINE: f64 = 16.0;

/// The DAG as SVG.
pub fn svg(pipeline: &Pipeline, stages: &[StageView<'_>]) -> String {
    let mut vg = VisualGraph::new(Orientation::TopToBottom);
    let mut handles = Vec::new();
    let labels: Vec<Vec<String>> = stages.iter().map(|s| label(pipeline, stages, s)).collect();
    for lines in &labels {
        let widest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(8) as f64;
        let size = Point::new(widest * FONT * 0.62 + 24.0, lines.len() as f64 * LINE + 16.0);
        let look = StyleAttr::new(layout::core::color::Color::fast("black"), 1, None, 6, FONT as usize);
        handles.push(vg.add_node(Element::create(ShapeKind::new_box(""), look, Orientation::TopToBottom, size)));
    }
    for (to, view) in stages.iter().enumerate() {
        for srcs in pipeline.stages[view.index].inputs.values() {
            for src in srcs {
                if let Some(from) = stages.iter().position(|s| s.index == *src) {
                    vg.add_edge(Arrow::simple(""), handles[from], handles[to]);
                }
            }
        }
    }
    let mut edges = Edges { min: (f64::MAX, f64::MAX), max: (f64::MIN, f64::MIN), ..Default::default() };
    if !handles.is_empty() {
        vg.do_it(false, false, false, &mut edges);
    }
    let boxes: Vec<(Point, Point)> = handles
        .iter()
        .map(|h| {
            let pos = vg.pos(*h);
            let (c, s) = (pos.center(), pos.size(false));
            (Point::new(c.x - s.x / 2.0, c.y - s.y / 2.0), s)
        })
        .collect();
    for (xy, size) in &boxes {
        edges.grow(*xy);
        edges.grow(Point::new(xy.x + size.x, xy.y + size.y));
    }
    let pad = 12.0;
    let (x0, y0) = if boxes.is_empty() { (0.0, 0.0) } else { (edges.min.0 - pad, edges.min.1 - pad) };
    let (w, h) = if boxes.is_empty() { (200.0, 40.0) } else { (edges.max.0 - x0 + pad, edges.max.1 - y0 + pad) };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="dag" viewBox="{x0:.1} {y0:.1} {w:.1} {h:.1}" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="{FONT}"><defs><marker id="arrowhead" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs><rect x="{x0:.1}" y="{y0:.1}" width="{w:.1}" height="{h:.1}" fill="white"/>"##
    );
    for d in &edges.paths {
        let _ = write!(
            s,
            r##"<path class="edge" d="{d}" stroke="#555" stroke-width="1.5" fill="none" marker-end="url(#arrowhead)"/>"##
        );
    }
    for ((view, lines), (xy, size)) in stages.iter().zip(&labels).zip(&boxes) {
        let (fill, status) = status_style(view.record);
        let _ = write!(
            s,
            r##"<g class="node" data-stage="{}" data-status="{status}"><title>{}</title><rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="6" fill="{fill}" stroke="#333"/>"##,
            escape(view.name),
            escape(&lines.join("\n")),
            xy.x,
            xy.y,
            size.x,
            size.y
        );
        for (i, line) in lines.iter().enumerate() {
            let weight = if i == 0 { r#" font-weight="bold""# } else { "" };
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle"{weight}>{}</text>"#,
                xy.x + size.x / 2.0,
                xy.y + 8.0 + LINE * (i as f64 + 0.75),
                escape(line)
            );
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>");
    s
}

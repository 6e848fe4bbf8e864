//! Histograms of a numeric column, drawn as SVG for the report and as text for a terminal.
//!
//! Bins are equal-width on a log axis when every value is positive and they span more than a
//! factor of ten (perplexities do: POINTS' captions run from about 3 to several thousand), else on
//! a linear axis. The rule, which a reader can redo by hand: with `B` bins between the smallest
//! value `lo` and the largest `hi`, a value `v` goes to bin `⌊(t(v) − t(lo)) / (t(hi) − t(lo)) · B⌋`,
//! the largest to the last bin, where `t` is `ln` on a log axis and the identity otherwise. All
//! values equal: one bin.

use std::fmt::Write as _;

pub const DEFAULT_BINS: usize = 40;

#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
}

impl Histogram {
    /// The histogram of `values` (finite ones; the caller counts the rest) in `bins` bins.
    pub fn of(values: &[f64], bins: usize) -> Option<Histogram> {
        let finite = || values.iter().copied().filter(|v| v.is_finite());
        let lo = finite().fold(f64::INFINITY, f64::min);
        let hi = finite().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return None;
        }
        let log = lo > 0.0 && hi / lo > 10.0;
        let bins = if lo == hi { 1 } else { bins.max(1) };
        let mut counts = vec![0u64; bins];
        let h = Histogram { counts: Vec::new(), lo, hi, log };
        for v in finite() {
            counts[h.bin(v, bins)] += 1;
        }
        Some(Histogram { counts, ..h })
    }

    fn t(&self, v: f64) -> f64 {
        if self.log { v.ln() } else { v }
    }

    fn bin(&self, v: f64, bins: usize) -> usize {
        if self.hi == self.lo {
            return 0;
        }
        let at = (self.t(v) - self.t(self.lo)) / (self.t(self.hi) - self.t(self.lo)) * bins as f64;
        (at.floor().max(0.0) as usize).min(bins - 1)
    }

    /// Where `v` sits along the axis, from 0 (the smallest value) to 1 (the largest).
    pub fn position(&self, v: f64) -> f64 {
        if self.hi == self.lo {
            return 0.5;
        }
        ((self.t(v) - self.t(self.lo)) / (self.t(self.hi) - self.t(self.lo))).clamp(0.0, 1.0)
    }

    /// The value at `position` along the axis.
    pub fn value_at(&self, position: f64) -> f64 {
        let t = self.t(self.lo) + position * (self.t(self.hi) - self.t(self.lo));
        if self.log { t.exp() } else { t }
    }

    /// The lower edge of each bin and the upper edge of the last.
    pub fn edges(&self) -> Vec<f64> {
        let n = self.counts.len();
        (0..=n).map(|i| self.value_at(i as f64 / n as f64)).collect()
    }
}

/// A cut drawn on a histogram: where a `select` downstream keeps records, and what it keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    pub at: f64,
    /// The kept side: values at or below the cut (`lowest`, `max`) or at or above it.
    pub keeps_below: bool,
    pub label: String,
}

/// A number as a figure labels it: 3 significant digits, no exponent below a million.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        return format!("{v:.2e}");
    }
    let digits = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}")
}

/// Escapes text for HTML and SVG.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The histogram as an SVG figure `width`×`height` (CSS pixels), bars with class `bar`, the cut
/// (if any) as a line with class `cut` and its label.
pub fn svg(h: &Histogram, column: &str, cut: Option<&Cut>, width: f64, height: f64) -> String {
    let (left, right, top, bottom) = (56.0, 16.0, 28.0, 40.0);
    let (w, ht) = (width - left - right, height - top - bottom);
    let max = h.counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let n = h.counts.len() as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="histogram" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
    let edges = h.edges();
    for (i, &c) in h.counts.iter().enumerate() {
        let x = left + w * i as f64 / n;
        let bh = ht * c as f64 / max;
        let _ = write!(
            s,
            r##"<rect class="bar" x="{x:.2}" y="{:.2}" width="{:.2}" height="{bh:.2}" fill="#4c78a8"><title>{} – {}: {c}</title></rect>"##,
            top + ht - bh,
            (w / n - 1.0).max(0.5),
            short(edges[i]),
            short(edges[i + 1]),
        );
    }
    // Axes and ticks: the ends, and powers of ten between them on a log axis.
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{y}" x2="{:.2}" y2="{y}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{y}" stroke="#333"/>"##,
        left + w,
        y = top + ht
    );
    let mut ticks = vec![h.lo, h.hi];
    if h.log {
        let mut p = 10f64.powf(h.lo.log10().ceil());
        while p < h.hi {
            ticks.push(p);
            p *= 10.0;
        }
    }
    for t in ticks {
        let x = left + w * h.position(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.2}" y1="{y}" x2="{x:.2}" y2="{:.2}" stroke="#333"/><text x="{x:.2}" y="{:.2}" text-anchor="middle">{}</text>"##,
            top + ht + 4.0,
            top + ht + 16.0,
            if t.fract() == 0.0 && t.abs() < 1e6 { format!("{t}") } else { short(t) },
            y = top + ht
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{}{}</text><text x="{left}" y="{:.2}" text-anchor="end" dx="-4">{}</text><text x="{left}" y="{:.2}" text-anchor="end" dx="-4">0</text>"#,
        left + w / 2.0,
        height - 6.0,
        escape(column),
        if h.log { " (log axis)" } else { "" },
        top + 4.0,
        max as u64,
        top + ht
    );
    if let Some(c) = cut {
        let x = left + w * h.position(c.at);
        // The label runs into the plot from the cut, on whichever side has the room.
        let (anchor, dx) = if x < left + w / 2.0 { ("start", 4) } else { ("end", -4) };
        let _ = write!(
            s,
            r##"<line class="cut" x1="{x:.2}" y1="{:.2}" x2="{x:.2}" y2="{:.2}" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/><text class="cut-label" x="{x:.2}" y="{:.2}" text-anchor="{anchor}" fill="#d62728" dx="{dx}">{} {}</text>"##,
            top - 6.0,
            top + ht,
            top - 10.0,
            if c.keeps_below { "◀" } else { "▶" },
            escape(&c.label)
        );
    }
    s.push_str("</svg>");
    s
}

/// The histogram in text, one line a bin, for a terminal (`ladle show --hist`): the bin's range,
/// its count and a bar; the bin holding the cut is marked.
pub fn text(h: &Histogram, cut: Option<&Cut>, width: usize) -> String {
    let max = h.counts.iter().copied().max().unwrap_or(1).max(1);
    let edges = h.edges();
    let cut_bin = cut.map(|c| h.bin(c.at, h.counts.len()));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} bins from {} to {}{}",
        h.counts.len(),
        short(h.lo),
        short(h.hi),
        if h.log { ", log axis" } else { "" }
    );
    for (i, &c) in h.counts.iter().enumerate() {
        let bar = "█".repeat(((c as f64 / max as f64) * width as f64).round() as usize);
        let mark = if cut_bin == Some(i) { "  ◀ cut" } else { "" };
        let _ = writeln!(s, "{:>10} – {:<10} {:>9} {bar}{mark}", short(edges[i]), short(edges[i + 1]), c);
    }
    if let Some(c) = cut {
        let _ = writeln!(s, "cut: {}", c.label);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_the_documented_rule_on_both_axes() {
        // Linear: 0..=9 in 5 bins of width 1.8; 9 (the largest) in the last.
        let h = Histogram::of(&(0..10).map(f64::from).collect::<Vec<_>>(), 5).unwrap();
        assert!(!h.log);
        assert_eq!(h.counts, vec![2, 2, 2, 2, 2]);
        // Log: 1, 10, 100, 1000 in 3 bins: each decade a bin, 1000 in the last.
        let h = Histogram::of(&[1.0, 10.0, 100.0, 1000.0, 999.0, f64::NAN], 3).unwrap();
        assert!(h.log);
        assert_eq!(h.counts, vec![1, 1, 3]);
        assert!((h.edges()[1] - 10.0).abs() < 1e-9);
        assert_eq!(Histogram::of(&[4.0, 4.0], 10).unwrap().counts, vec![2]);
        assert!(Histogram::of(&[f64::NAN], 10).is_none());
    }
}

//! Figures as PNG, for a paper: each SVG figure rasterized by resvg at 3× its CSS size (about
//! 300 dpi where the page's figures print at their CSS size), text set in the system's fonts.
//! Where the system has no font at all, the figures are written without their text and the
//! caller is told so.

use std::sync::{Arc, OnceLock};

use resvg::{tiny_skia, usvg};

/// How many pixels a PNG figure has per CSS pixel of its SVG.
pub const SCALE: f32 = 3.0;

fn fonts() -> Arc<usvg::fontdb::Database> {
    static FONTS: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = usvg::fontdb::Database::new();
            db.load_system_fonts();
            // The figures ask for `sans-serif`; fontdb's default (Arial) is rarely installed on
            // Linux, so take a sans face that is.
            let families: Vec<String> =
                db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
            let sans = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica"]
                .iter()
                .find(|want| families.iter().any(|f| f == *want))
                .map(|s| s.to_string())
                .or_else(|| families.first().cloned());
            if let Some(sans) = sans {
                db.set_sans_serif_family(sans);
            }
            Arc::new(db)
        })
        .clone()
}

/// Whether the system has a font to set the figures' text in.
pub fn has_fonts() -> bool {
    !fonts().is_empty()
}

/// The figure `svg` as PNG bytes at [`SCALE`].
pub fn render(svg: &str) -> Result<Vec<u8>, String> {
    let options = usvg::Options { fontdb: fonts(), ..Default::default() };
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| format!("cannot read the figure's SVG: {e}"))?;
    let size = tree.size();
    let (w, h) = ((size.width() * SCALE).ceil() as u32, (size.height() * SCALE).ceil() as u32);
    let mut pixmap = tiny_skia::Pixmap::new(w.max(1), h.max(1)).ok_or("the figure is too large to rasterize")?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::from_scale(SCALE, SCALE), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| format!("cannot encode the PNG: {e}"))
}

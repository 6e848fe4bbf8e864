//! CATTY geometry against WePOINTS' reference implementation (tests/fixtures/catty.json).

use std::path::Path;

use ladle_models::vision::catty::tiling;
use serde_json::Value;

#[test]
fn catty_geometry_equals_the_reference_exactly() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/catty.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cases.len(), 20);
    let u = |v: &Value| v.as_u64().unwrap() as u32;
    for case in &cases {
        let [iw, ih] = [u(&case["input"][0]), u(&case["input"][1])];
        let t = tiling(iw, ih, u(&case["image_size"]), u(&case["max_splits"]));
        let label = format!("{iw}x{ih} size {} max {}", case["image_size"], case["max_splits"]);
        assert_eq!(t.clamped, [u(&case["width"]), u(&case["height"])], "{label}: clamped");
        assert_eq!(serde_json::to_value(t.slices).unwrap(), case["slices"], "{label}: slices");
        assert_eq!(serde_json::to_value(t.resized).unwrap(), case["resized"], "{label}: resized");
        assert_eq!(serde_json::to_value(&t.tiles).unwrap(), case["tiles"], "{label}: tiles");
        assert_eq!(Value::Bool(t.thumbnail), case["thumbnail"], "{label}: thumbnail");
    }
}

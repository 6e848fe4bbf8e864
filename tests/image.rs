//! `ladle image tiles`: CATTY geometry of real image files, and bad images.

mod common;

use common::Project;
use serde_json::Value;

#[test]
fn tiles_of_an_image_file_match_the_reference() {
    let p = Project::new();
    image::RgbImage::new(640, 480).save(p.path("wide.png")).unwrap();
    let out = p.ladle(&["image", "tiles", "wide.png", "--size", "336", "--max-splits", "8"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fixture: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catty.json"))
            .unwrap(),
    )
    .unwrap();
    let want = fixture.iter().find(|c| c["input"] == serde_json::json!([640, 480]) && c["image_size"] == 336).unwrap();
    for key in ["slices", "resized", "tiles", "thumbnail"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    assert_eq!(got["input"], serde_json::json!([640, 480]));
}

#[test]
fn bad_images_give_one_clear_error() {
    let p = Project::new();
    p.write("empty.png", b"");
    p.write("notes.jpg", b"this is not a jpeg");
    for (file, expect) in [
        ("empty.png", "empty.png: cannot read the image"),
        ("notes.jpg", "notes.jpg: cannot read the image"),
        ("missing.png", "missing.png: cannot read the image"),
    ] {
        let out = p.ladle(&["image", "tiles", file]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.contains(expect), "{file}: {err}");
    }
}

//! Where a record's image comes from: the `image = "{field}"` parameter of the stages that read
//! images.
//!
//! A field holds either a path or an embedded image:
//! - a string: a path. Relative paths resolve against the dataset's root, the folder of the data
//!   file it was read from, and must stay inside it (`../` that leaves it is refused, so a
//!   dataset cannot reach files its author did not ship); absolute paths are used as they are.
//! - an object `{bytes, path}`: the struct Hugging Face datasets write for `Image` columns in
//!   Parquet. `read` turns binary into hex, so `bytes` is a hex string; when it is null, `path`
//!   is used as above.
//!
//! A template with text around fields (`"images/{id}.jpg"`) renders to a path.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::template::Template;

/// An image a record names.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    File(PathBuf),
    /// Encoded bytes embedded in the record; `name` is what errors call it.
    Bytes {
        data: Vec<u8>,
        name: String,
    },
}

impl ImageRef {
    /// Decodes the image to RGB (see [`ladle_models::vision::images::decode_rgb`]).
    pub fn load(&self) -> Result<image::RgbImage, ladle_models::vision::images::ImageError> {
        match self {
            ImageRef::File(path) => ladle_models::vision::images::load_rgb(path),
            ImageRef::Bytes { data, name } => ladle_models::vision::images::decode_rgb(data, name),
        }
    }
}

/// The `image` parameter: a field (or template) naming each record's image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageField {
    template: Template,
    source: String,
}

impl ImageField {
    pub fn parse(src: &str) -> Result<ImageField, String> {
        let template = Template::parse(src)?;
        if template.fields().is_empty() {
            return Err(format!(
                "\"{src}\" names no field: write the field holding each record's image, e.g. \"{{image}}\""
            ));
        }
        Ok(ImageField { template, source: src.to_string() })
    }

    /// The record's image. `root` is the dataset's root (see [`ladle_engine::Artifact::Dataset`]).
    pub fn locate(&self, record: &Map<String, Value>, root: Option<&Path>) -> Result<ImageRef, String> {
        let value = match self.template.single_field(record) {
            Some(v) => v?.clone(),
            None => Value::String(self.template.render(record)?),
        };
        match value {
            Value::String(s) => resolve(&s, root).map(ImageRef::File),
            Value::Object(o) => match (o.get("bytes"), o.get("path")) {
                (Some(Value::String(hex)), path) => {
                    let name = match path {
                        Some(Value::String(p)) if !p.is_empty() => format!("{} (`{p}`, embedded)", self.source),
                        _ => format!("{} (embedded)", self.source),
                    };
                    let data = decode_hex(hex).ok_or_else(|| {
                        format!("{name}: `bytes` is not hex-encoded binary (as `read` writes Parquet binary columns)")
                    })?;
                    Ok(ImageRef::Bytes { data, name })
                }
                (None | Some(Value::Null), Some(Value::String(p))) => resolve(p, root).map(ImageRef::File),
                _ => Err(format!(
                    "{} is an object without `bytes` or `path`; an image is a path or a {{bytes, path}} struct",
                    self.source
                )),
            },
            Value::Null => Err(format!("{} is null: the record has no image", self.source)),
            other => Err(format!(
                "{} is {}; an image is a path (a string) or a {{bytes, path}} struct",
                self.source,
                ladle_engine::records::json_type(&other)
            )),
        }
    }
}

impl ImageField {
    /// The image files the records of a shard name, for their digests in the shard's key
    /// ([`ladle_engine::stage::MapStage::record_files`]); records whose image cannot be located
    /// are left for the stage to report (or drop) with their position.
    pub fn files_of_shard(
        &self,
        root: Option<&Path>,
        shard: &ladle_engine::stage::ShardInput<'_>,
    ) -> Result<Vec<PathBuf>, ladle_engine::StageError> {
        let mut files = Vec::new();
        for (i, line) in ladle_engine::records::lines(shard.jsonl).enumerate() {
            let record = ladle_engine::records::parse_record(line)
                .map_err(|e| ladle_engine::StageError::internal(e).at_record(i as u64))?;
            if let Ok(ImageRef::File(path)) = self.locate(&record, root) {
                files.push(path);
            }
        }
        Ok(files)
    }
}

/// The error for a record whose image cannot be used, with the way out.
pub fn bad_image(message: String) -> ladle_engine::StageError {
    ladle_engine::StageError::input(message)
        .with_hint("fix or remove the image, or set on_bad_image = \"drop\" to drop such records")
}

/// A path from a record, resolved against the dataset's root.
fn resolve(written: &str, root: Option<&Path>) -> Result<PathBuf, String> {
    if written.trim().is_empty() {
        return Err("the image path is empty".into());
    }
    let path = Path::new(written);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let Some(root) = root else {
        return Err(format!(
            "the image path `{written}` is relative, but this dataset does not know which folder it is relative to \
             (it was not read from a data file, or was concatenated from data files in different folders); \
             use absolute paths"
        ));
    };
    // Lexically: `a/../b` is fine, `../b` leaves the folder.
    let mut depth = 0i32;
    for c in path.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(format!(
                "the image path `{written}` leads outside the data file's folder ({}); paths in records must stay \
                 inside it, or be absolute",
                root.display()
            ));
        }
    }
    Ok(root.join(path))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn paths_resolve_against_the_root_and_stay_inside_it() {
        let f = ImageField::parse("{image}").unwrap();
        let root = Path::new("/data/set");
        let at = |p: &str| f.locate(&rec(serde_json::json!({ "image": p })), Some(root));
        assert_eq!(at("a/b.jpg").unwrap(), ImageRef::File("/data/set/a/b.jpg".into()));
        assert_eq!(at("a/../b.jpg").unwrap(), ImageRef::File("/data/set/a/../b.jpg".into()));
        assert_eq!(at("/abs/c.png").unwrap(), ImageRef::File("/abs/c.png".into()));
        let e = at("../../etc/passwd").unwrap_err();
        assert!(e.contains("outside the data file's folder (/data/set)"), "{e}");
        let e = at("a/../../x.jpg").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e = f.locate(&rec(serde_json::json!({ "image": "a.jpg" })), None).unwrap_err();
        assert!(e.contains("does not know which folder"), "{e}");
    }

    #[test]
    fn embedded_images_are_hex_bytes_and_null_bytes_fall_back_to_the_path() {
        let f = ImageField::parse("{img}").unwrap();
        let root = Some(Path::new("/d"));
        let got = f.locate(&rec(serde_json::json!({ "img": { "bytes": "ff0a", "path": "x.png" } })), root).unwrap();
        assert_eq!(got, ImageRef::Bytes { data: vec![0xff, 0x0a], name: "{img} (`x.png`, embedded)".into() });
        let got = f.locate(&rec(serde_json::json!({ "img": { "bytes": null, "path": "x.png" } })), root).unwrap();
        assert_eq!(got, ImageRef::File("/d/x.png".into()));
        assert!(f.locate(&rec(serde_json::json!({ "img": { "bytes": "xyz" } })), root).is_err());
        assert!(f.locate(&rec(serde_json::json!({ "img": 3 })), root).unwrap_err().contains("is a number"));
        assert!(f.locate(&rec(serde_json::json!({ "img": null })), root).unwrap_err().contains("no image"));
        assert!(f.locate(&rec(serde_json::json!({})), root).is_err());
    }

    #[test]
    fn templates_with_text_render_to_paths() {
        let f = ImageField::parse("imgs/{id}.jpg").unwrap();
        let got = f.locate(&rec(serde_json::json!({ "id": 7 })), Some(Path::new("/d"))).unwrap();
        assert_eq!(got, ImageRef::File("/d/imgs/7.jpg".into()));
        assert!(ImageField::parse("static.jpg").is_err());
    }
}

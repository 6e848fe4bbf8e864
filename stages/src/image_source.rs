//! Where a record's image comes from: the `image = "{field}"` parameter of the stages that read
//! images.
//!
//! A field holds either a path or an embedded image:
//! - a string: a path. Relative paths resolve against the dataset's root, the folder of the data
//!   file it was read from, and must stay inside it (`../` that leaves it is refused, so a
//!   dataset cannot reach files its author did not ship); absolute paths are used as they are.
//! - a string holding the image itself: a `data:image/...;base64,` URI, or plain base64 of the
//!   file as WePOINTS' JSONL carries it (told from a path by the base64 of a PNG, JPEG, WebP or
//!   GIF signature at its start and no `.` in it). An embedded image is part of its record, so
//!   its bytes are in the shard's digest: editing one rescores only its shard, as for files.
//! - an object `{bytes, path}`: the struct Hugging Face datasets write for `Image` columns in
//!   Parquet. `read` turns binary into base64, so `bytes` is a base64 string (hex, as `read`
//!   wrote it before, is still understood); when it is null, `path` is used as above.
//!
//! - an object `{tar, offset, length}`: a member of a WebDataset tar (see [`crate::webdataset`]),
//!   read in place; `tar` resolves as a path does, and the tar's digest joins the shard's key.
//! - an object `{parquet, row, column}`: an `Image` value of a Parquet file, read in place (see
//!   [`crate::parquet_images`]); likewise resolved, and the file's digest joins the key.
//!
//! A template with text around fields (`"images/{id}.jpg"`) renders to a path.

use std::path::{Component, Path, PathBuf};

use ladle_models::vision::images::RgbConvention;
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
    /// Encoded bytes at `offset` in a file (a tar's member).
    InFile {
        path: PathBuf,
        offset: u64,
        length: u64,
        name: String,
    },
    /// The `Image` value of `column` at `row` of a Parquet file.
    InParquet {
        path: PathBuf,
        row: u64,
        column: String,
        name: String,
    },
}

impl ImageRef {
    /// Decodes the image to RGB as displayed (EXIF orientation applied; see
    /// [`ladle_models::vision::images::decode_rgb`]).
    pub fn load(&self) -> Result<image::RgbImage, ladle_models::vision::images::ImageError> {
        self.load_as(RgbConvention::Displayed)
    }

    /// Decodes the image to RGB as the model's reference reads images.
    pub fn load_as(
        &self,
        convention: RgbConvention,
    ) -> Result<image::RgbImage, ladle_models::vision::images::ImageError> {
        use ladle_models::vision::images::{ImageError, decode_rgb_as, load_rgb_as};
        match self {
            ImageRef::File(path) => load_rgb_as(path, convention),
            ImageRef::Bytes { data, name } => decode_rgb_as(data, name, convention),
            ImageRef::InFile { name, .. } | ImageRef::InParquet { name, .. } => {
                let data = self.encoded().map_err(|message| ImageError::Unreadable { path: name.clone(), message })?;
                decode_rgb_as(&data, name, convention)
            }
        }
    }

    /// The image's encoded bytes (the file as it was saved), wherever they are.
    pub fn encoded(&self) -> Result<Vec<u8>, String> {
        match self {
            ImageRef::File(path) => std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display())),
            ImageRef::Bytes { data, .. } => Ok(data.clone()),
            ImageRef::InFile { path, offset, length, .. } => read_range(path, *offset, *length)
                .map_err(|e| format!("cannot read {length} bytes at offset {offset} of {}: {e}", path.display())),
            ImageRef::InParquet { path, row, column, .. } => crate::parquet_images::read(path, *row, column),
        }
    }

    /// The file whose digest stands for this image in keys: the image file, or the tar or
    /// Parquet file holding it.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ImageRef::File(path) | ImageRef::InFile { path, .. } | ImageRef::InParquet { path, .. } => Some(path),
            ImageRef::Bytes { .. } => None,
        }
    }
}

/// The `image` parameter: a field (or template) naming each record's image, or alternatives
/// `{jpg;png;webp}` (the first field a record has, as webdataset's `rename` picks one: samples of
/// one corpus carry their image under the extension it was saved with).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageField {
    template: Template,
    alternatives: Vec<(String, Template)>,
    source: String,
}

impl ImageField {
    pub fn parse(src: &str) -> Result<ImageField, String> {
        let inner = src.strip_prefix('{').and_then(|s| s.strip_suffix('}')).filter(|s| s.contains(';'));
        if let Some(inner) = inner {
            let mut alternatives = Vec::new();
            for name in inner.split(';').map(str::trim) {
                if name.is_empty() || name.contains(['{', '}']) {
                    return Err(format!(
                        "\"{src}\": alternatives are field names separated by `;`, e.g. \"{{jpg;png;webp}}\""
                    ));
                }
                alternatives.push((name.to_string(), Template::parse(&format!("{{{name}}}"))?));
            }
            let template = alternatives[0].1.clone();
            return Ok(ImageField { template, alternatives, source: src.to_string() });
        }
        let template = Template::parse(src)?;
        if template.fields().is_empty() {
            return Err(format!(
                "\"{src}\" names no field: write the field holding each record's image, e.g. \"{{image}}\""
            ));
        }
        Ok(ImageField { template, alternatives: Vec::new(), source: src.to_string() })
    }

    /// The fields it may read (each alternative's).
    pub fn fields(&self) -> Vec<String> {
        if self.alternatives.is_empty() {
            return self.template.fields();
        }
        self.alternatives.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The template that applies to `record`: the first alternative it has.
    fn template_for(&self, record: &Map<String, Value>) -> Result<&Template, String> {
        if self.alternatives.is_empty() {
            return Ok(&self.template);
        }
        for (_, t) in &self.alternatives {
            if t.single_field(record).is_some_and(|v| v.is_ok_and(|v| !v.is_null())) {
                return Ok(t);
            }
        }
        let names: Vec<&str> = self.alternatives.iter().map(|(n, _)| n.as_str()).collect();
        Err(format!("the record has none of the fields {}: it has no image", names.join(", ")))
    }

    /// The record's image. `root` is the dataset's root (see [`ladle_engine::Artifact::Dataset`]).
    pub fn locate(&self, record: &Map<String, Value>, root: Option<&Path>) -> Result<ImageRef, String> {
        let template = self.template_for(record)?;
        let value = match template.single_field(record) {
            Some(v) => v?.clone(),
            None => Value::String(template.render(record)?),
        };
        match value {
            Value::String(s) => match embedded(&s, &self.source)? {
                Some(image) => Ok(image),
                None => resolve(&s, root).map(ImageRef::File),
            },
            Value::Object(o) if o.contains_key("tar") => {
                let (Some(Value::String(tar)), Some(offset), Some(length)) =
                    (o.get("tar"), o.get("offset").and_then(Value::as_u64), o.get("length").and_then(Value::as_u64))
                else {
                    return Err(format!(
                        "{} is a tar reference without a `tar` name, `offset` and `length`; `read` writes them whole",
                        self.source
                    ));
                };
                let path = resolve(tar, root)?;
                let name = format!("{} (`{tar}` at offset {offset})", self.source);
                Ok(ImageRef::InFile { path, offset, length, name })
            }
            Value::Object(o) if o.contains_key("parquet") => {
                let (Some(Value::String(file)), Some(row), Some(Value::String(column))) =
                    (o.get("parquet"), o.get("row").and_then(Value::as_u64), o.get("column"))
                else {
                    return Err(format!(
                        "{} is a Parquet reference without a `parquet` name, `row` and `column`; `read` writes them whole",
                        self.source
                    ));
                };
                let path = resolve(file, root)?;
                let name = match o.get("path") {
                    Some(Value::String(p)) if !p.is_empty() => {
                        format!("{} (`{p}`, row {row} of `{file}`)", self.source)
                    }
                    _ => format!("{} (row {row} of `{file}`)", self.source),
                };
                Ok(ImageRef::InParquet { path, row, column: column.clone(), name })
            }
            Value::Object(o) => match (o.get("bytes"), o.get("path")) {
                (Some(Value::String(text)), path) => {
                    let name = match path {
                        Some(Value::String(p)) if !p.is_empty() => format!("{} (`{p}`, embedded)", self.source),
                        _ => format!("{} (embedded)", self.source),
                    };
                    let data = decode_struct_bytes(text).map_err(|e| {
                        format!("{name}: `bytes` is {e}; `read` writes Parquet binary columns as base64")
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
            if let Ok(image) = self.locate(&record, root)
                && let Some(path) = image.file()
            {
                files.push(path.to_path_buf());
            }
        }
        Ok(files)
    }
}

/// The file a reference `read` made points into (`{tar, …}` or `{parquet, …}`), resolved against
/// the dataset's `root`; `None` for any other value, or one that does not resolve.
pub fn referenced_file(value: &Value, root: Option<&Path>) -> Option<PathBuf> {
    let Value::Object(o) = value else { return None };
    let name = match (o.get("tar"), o.get("parquet")) {
        (Some(Value::String(tar)), _) if o.contains_key("offset") => tar,
        (_, Some(Value::String(file))) if o.contains_key("row") => file,
        _ => return None,
    };
    resolve(name, root).ok()
}

/// `length` bytes at `offset` of a file.
pub fn read_range(path: &Path, offset: u64, length: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    if length > 1 << 31 {
        return Err(std::io::Error::other(format!("{length} bytes is no image")));
    }
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut data = vec![0u8; length as usize];
    file.read_exact(&mut data)?;
    Ok(data)
}

/// How base64 of PNG, JPEG, WebP and GIF files starts (`\x89PNG\r\n\x1a\n`, `\xff\xd8\xff`,
/// `RIFF`, `GIF8`).
const BASE64_SIGNATURES: [&str; 4] = ["iVBORw0KGgo", "/9j/", "UklGR", "R0lGOD"];

/// The image a string holds itself, if it does: a `data:` URI or plain base64 (see the module
/// docs); `None` for a path.
fn embedded(s: &str, source: &str) -> Result<Option<ImageRef>, String> {
    if let Some(rest) = s.strip_prefix("data:") {
        let (meta, payload) =
            rest.split_once(',').ok_or_else(|| format!("{source} is a data URI without a `,` before its data"))?;
        let Some(media) = meta.strip_suffix(";base64") else {
            return Err(format!(
                "{source} is a data URI that is not base64 (`data:{meta},…`); images in records are base64"
            ));
        };
        if !media.is_empty() && !media.starts_with("image") {
            return Err(format!("{source} is a data URI of `{media}`, not of an image"));
        }
        let name = format!("{source} (a data URI)");
        return decode_base64(payload)
            .map(|data| Some(ImageRef::Bytes { data, name: name.clone() }))
            .map_err(|e| format!("{name}: {e}"));
    }
    if !BASE64_SIGNATURES.iter().any(|sig| s.starts_with(sig)) || s.contains('.') {
        return Ok(None);
    }
    let name = format!("{source} (base64)");
    decode_base64(s).map(|data| Some(ImageRef::Bytes { data, name: name.clone() })).map_err(|e| format!("{name}: {e}"))
}

/// Standard base64, padded or not, line breaks allowed.
fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let result = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        LENIENT.decode(text.bytes().filter(|b| !b.is_ascii_whitespace()).collect::<Vec<u8>>())
    } else {
        LENIENT.decode(text)
    };
    result.map_err(|e| format!("not valid base64 ({e})"))
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

/// A `{bytes, path}` struct's bytes: base64, or the hex `read` wrote before (told apart by the
/// image signature the hex decodes to: no base64 of an image is all hex digits).
fn decode_struct_bytes(text: &str) -> Result<Vec<u8>, String> {
    if let Some(bytes) = decode_hex(text)
        && IMAGE_SIGNATURES.iter().any(|sig| bytes.starts_with(sig))
    {
        return Ok(bytes);
    }
    decode_base64(text)
}

/// The first bytes of the image files ladle decodes (PNG, JPEG, WebP's RIFF, GIF).
const IMAGE_SIGNATURES: [&[u8]; 4] = [b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8"];

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
    fn struct_bytes_are_base64_or_the_hex_of_older_stores_and_null_bytes_fall_back_to_the_path() {
        let f = ImageField::parse("{img}").unwrap();
        let root = Some(Path::new("/d"));
        // A JPEG's first bytes, in base64 (what `read` writes) and in hex (what it wrote before).
        let jpeg = vec![0xff, 0xd8, 0xff, 0xe0];
        for text in ["/9j/4A==", "ffd8ffe0"] {
            let got = f.locate(&rec(serde_json::json!({ "img": { "bytes": text, "path": "x.png" } })), root).unwrap();
            assert_eq!(got, ImageRef::Bytes { data: jpeg.clone(), name: "{img} (`x.png`, embedded)".into() }, "{text}");
        }
        // Hex digits that decode to no image are base64 ("ff0a" is three bytes of base64).
        let got = f.locate(&rec(serde_json::json!({ "img": { "bytes": "ff0a" } })), root).unwrap();
        assert_eq!(got, ImageRef::Bytes { data: vec![125, 253, 26], name: "{img} (embedded)".into() });
        let got = f.locate(&rec(serde_json::json!({ "img": { "bytes": null, "path": "x.png" } })), root).unwrap();
        assert_eq!(got, ImageRef::File("/d/x.png".into()));
        let e = f.locate(&rec(serde_json::json!({ "img": { "bytes": "x!z" } })), root).unwrap_err();
        assert!(e.contains("not valid base64") && e.contains("`read` writes"), "{e}");
        assert!(f.locate(&rec(serde_json::json!({ "img": 3 })), root).unwrap_err().contains("is a number"));
        assert!(f.locate(&rec(serde_json::json!({ "img": null })), root).unwrap_err().contains("no image"));
        assert!(f.locate(&rec(serde_json::json!({})), root).is_err());
    }

    #[test]
    fn base64_and_data_uris_are_told_from_paths() {
        let field = ImageField::parse("{image}").unwrap();
        let locate = |v: &str| field.locate(&rec(serde_json::json!({"image": v})), Some(Path::new("/data")));
        // "\x89PNG\r\n\x1a\n" in base64, padded and not, and as a data URI.
        let png = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        for written in
            ["iVBORw0KGgo=", "iVBORw0KGgo", "data:image/png;base64,iVBORw0KGgo=", "data:;base64,iVBORw0K\nGgo="]
        {
            match locate(written).unwrap() {
                ImageRef::Bytes { data, .. } => assert_eq!(data, png, "{written}"),
                other => panic!("{written}: {other:?}"),
            }
        }
        // Paths stay paths, even ones that start like base64.
        assert_eq!(locate("/9j/photo.jpg").unwrap(), ImageRef::File("/9j/photo.jpg".into()));
        assert_eq!(locate("iVBORw0KGgo.png").unwrap(), ImageRef::File("/data/iVBORw0KGgo.png".into()));
        assert_eq!(locate("images/a.png").unwrap(), ImageRef::File("/data/images/a.png".into()));
        assert!(locate("iVBORw0KGgo*").unwrap_err().contains("not valid base64"));
        assert!(locate("data:image/png,rawbytes").unwrap_err().contains("not base64"));
        assert!(locate("data:application/pdf;base64,JVBERi0=").unwrap_err().contains("not of an image"));
        assert!(locate("data:image/png;base64").unwrap_err().contains("without a `,`"));
    }

    #[test]
    fn templates_with_text_render_to_paths() {
        let f = ImageField::parse("imgs/{id}.jpg").unwrap();
        let got = f.locate(&rec(serde_json::json!({ "id": 7 })), Some(Path::new("/d"))).unwrap();
        assert_eq!(got, ImageRef::File("/d/imgs/7.jpg".into()));
        assert!(ImageField::parse("static.jpg").is_err());
    }

    #[test]
    fn alternatives_take_the_first_field_a_record_has_and_tar_references_read_in_place() {
        let f = ImageField::parse("{jpg;png;webp}").unwrap();
        let root = Some(Path::new("/d"));
        let member = serde_json::json!({ "tar": "shards/00001.tar", "offset": 1536, "length": 20 });
        let got = f.locate(&rec(serde_json::json!({ "txt": "a cat", "png": member })), root).unwrap();
        let want = ImageRef::InFile {
            path: "/d/shards/00001.tar".into(),
            offset: 1536,
            length: 20,
            name: "{jpg;png;webp} (`shards/00001.tar` at offset 1536)".into(),
        };
        assert_eq!(got, want);
        assert_eq!(got.file(), Some(Path::new("/d/shards/00001.tar")), "the tar's digest joins the key");
        let e = f.locate(&rec(serde_json::json!({ "txt": "no image" })), root).unwrap_err();
        assert!(e.contains("none of the fields jpg, png, webp"), "{e}");
        let e = f.locate(&rec(serde_json::json!({ "jpg": { "tar": "a.tar" } })), root).unwrap_err();
        assert!(e.contains("without a `tar` name, `offset` and `length`"), "{e}");
        assert!(ImageField::parse("{jpg;}").is_err());
    }
}

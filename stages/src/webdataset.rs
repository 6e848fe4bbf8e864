//! WebDataset tars in: one record per sample, its images as references into the tar.
//!
//! img2dataset and the `webdataset` library write a corpus as tars whose members are grouped by
//! sample: `KEY.jpg`, `KEY.txt`, `KEY.json` one after another. A member's key is its path up to
//! the first `.` of its file name, its field the rest (`00012.jpg` → key `00012`, field `jpg`),
//! as the `webdataset` reader splits them. A record holds `__key__`, each text member as a
//! string (`json` parsed, kept under `json`), and each image (or other binary member) as a
//! reference `{"tar": NAME, "offset": N, "length": N}`: where its bytes sit in the tar, relative
//! to the dataset's root. The image readers (perplexity, encode, generate) read them in place,
//! so no image byte is copied into the store, and the tar's digest joins the shard keys as an
//! image file's does.
//!
//! Tars out ([`TarWriter`]): a record becomes `KEY.<image ext>` (its image's bytes, copied from
//! wherever the record points: a tar, a file, base64, Parquet bytes), `KEY.txt` (its text) and
//! `KEY.json` (every other field; a `json` object merged in), plus any other member a tar
//! reference names, so what a filter kept is a training set a webdataset loader reads as is.
//! Headers carry no time, owner or mode of the machine: the same records make the same bytes.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use ladle_engine::StageError;
use serde_json::{Map, Value};

/// Members whose bytes stay in the tar (read in place), by extension.
const BINARY_EXTENSIONS: &[&str] =
    &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "npy", "pth", "mp4", "wav"];

/// A sample's key and field for a member path.
pub fn split_member(path: &str) -> Option<(&str, &str)> {
    let name_at = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[name_at..].find('.')? + name_at;
    let (key, field) = (&path[..dot], &path[dot + 1..]);
    (!key.is_empty() && !field.is_empty()).then_some((key, field))
}

/// Reads the samples of the tar at `path` in order, handing each to `sample`. `name` is how
/// records refer to the tar (relative to the dataset's root). A malformed tar is an error
/// naming it and the offset of the member that is bad.
pub fn read_samples(
    path: &Path,
    name: &str,
    mut sample: impl FnMut(Map<String, Value>) -> Result<(), StageError>,
) -> Result<u64, StageError> {
    let bad = |offset: u64, what: String| {
        StageError::input(format!("{}: {what} (the member at offset {offset})", path.display()))
            .with_hint("the tar is damaged or truncated: write it again, or leave it out of `path`")
    };
    let file = File::open(path).map_err(|e| StageError::input(format!("cannot open {}: {e}", path.display())))?;
    let length = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| bad(0, format!("not a tar: {e}")))?;
    let mut current: Option<(String, Map<String, Value>)> = None;
    let mut count = 0u64;
    // Where the next header should be: what an error points at when the tar crate gives none.
    let mut next_header = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(next_header, format!("bad tar header: {e}")))?;
        let header_at = entry.raw_header_position();
        let data_at = entry.raw_file_position();
        let size = entry.size();
        next_header = data_at + size.div_ceil(512) * 512;
        if data_at + size > length {
            return Err(bad(
                header_at,
                format!("member `{}` is truncated", String::from_utf8_lossy(&entry.path_bytes())),
            ));
        }
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some((key, field)) = split_member(&member) else { continue };
        let field = field.to_ascii_lowercase();
        if current.as_ref().is_none_or(|(k, _)| k != key) {
            if let Some((_, done)) = current.take() {
                sample(done)?;
                count += 1;
            }
            let mut record = Map::new();
            record.insert("__key__".into(), Value::String(key.to_string()));
            current = Some((key.to_string(), record));
        }
        let (_, record) = current.as_mut().expect("set above");
        if record.contains_key(&field) {
            return Err(bad(header_at, format!("sample `{key}` has two `{field}` members")));
        }
        let reference = || {
            let mut r = Map::new();
            r.insert("tar".into(), Value::String(name.to_string()));
            r.insert("offset".into(), data_at.into());
            r.insert("length".into(), size.into());
            Value::Object(r)
        };
        let extension = field.rsplit('.').next().unwrap_or(&field);
        let value = if BINARY_EXTENSIONS.contains(&extension) {
            reference()
        } else {
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).map_err(|e| bad(header_at, format!("cannot read `{member}`: {e}")))?;
            match (extension, String::from_utf8(bytes)) {
                ("json", Ok(text)) => serde_json::from_str(&text)
                    .map_err(|e| bad(header_at, format!("`{member}` is not valid JSON: {e}")))?,
                (_, Ok(text)) => Value::String(text),
                (_, Err(_)) => reference(),
            }
        };
        record.insert(field, value);
    }
    if let Some((_, done)) = current.take() {
        sample(done)?;
        count += 1;
    }
    Ok(count)
}

/// How records become samples.
pub struct SampleLayout {
    /// The field (or alternatives) holding each record's image; `None`: members that are tar
    /// references are copied under their field's name.
    pub image: Option<crate::image_source::ImageField>,
    /// The field written as `KEY.txt` (`txt` when there is one).
    pub text: Option<crate::template::Template>,
    /// The dataset's root, against which image paths and tar names resolve.
    pub root: Option<std::path::PathBuf>,
}

/// Writes samples into one tar.
pub struct TarWriter<W: std::io::Write> {
    builder: tar::Builder<W>,
}

impl<W: std::io::Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        TarWriter { builder }
    }

    fn member(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o444);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        self.builder.append_data(&mut header, name, data)
    }

    /// Writes `record` (the `position`-th of the dataset) as one sample. Errors name the record's
    /// key and what could not be written.
    pub fn sample(&mut self, record: &Map<String, Value>, position: u64, layout: &SampleLayout) -> Result<(), String> {
        let key = match record.get("__key__") {
            Some(Value::String(k)) if !k.is_empty() && !k.contains('.') => k.clone(),
            _ => format!("{position:09}"),
        };
        let io = |e: std::io::Error| format!("sample `{key}`: cannot write it: {e}");
        let mut rest = record.clone();
        rest.remove("__key__");
        let root = layout.root.as_deref();
        // The image.
        if let Some(field) = &layout.image {
            let image = field.locate(record, root).map_err(|e| format!("sample `{key}`: {e}"))?;
            let bytes = image.encoded().map_err(|e| format!("sample `{key}`: {e}"))?;
            self.member(&format!("{key}.{}", image_extension(&bytes)), &bytes).map_err(io)?;
            for name in field.fields() {
                rest.remove(&name);
            }
        }
        // The text.
        let text = match &layout.text {
            Some(t) => {
                for name in t.fields() {
                    rest.remove(&name);
                }
                Some(t.render(record).map_err(|e| format!("sample `{key}`: text: {e}"))?)
            }
            None => match rest.remove("txt") {
                Some(Value::String(t)) => Some(t),
                Some(other) => {
                    rest.insert("txt".into(), other);
                    None
                }
                None => None,
            },
        };
        // Members that point into tars, copied as they are.
        let references: Vec<String> = rest
            .iter()
            .filter(|(_, v)| v.get("tar").is_some() && v.get("offset").is_some() && v.get("length").is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let mut members = Vec::new();
        for field in references {
            let value = rest.remove(&field).expect("listed above");
            let reference = crate::image_source::ImageField::parse(&format!("{{{field}}}"))
                .and_then(|f| f.locate(&Map::from_iter([(field.clone(), value)]), root))
                .map_err(|e| format!("sample `{key}`: {e}"))?;
            members.push((field, reference.encoded().map_err(|e| format!("sample `{key}`: {e}"))?));
        }
        for (field, bytes) in &members {
            self.member(&format!("{key}.{field}"), bytes).map_err(io)?;
        }
        if let Some(t) = text {
            self.member(&format!("{key}.txt"), t.as_bytes()).map_err(io)?;
        }
        // Everything else as JSON, a `json` object merged at the top.
        let mut json = match rest.remove("json") {
            Some(Value::Object(o)) => o,
            Some(other) => Map::from_iter([("json".to_string(), other)]),
            None => Map::new(),
        };
        json.extend(rest);
        if !json.is_empty() {
            let text = serde_json::to_vec(&Value::Object(json)).map_err(|e| format!("sample `{key}`: {e}"))?;
            self.member(&format!("{key}.json"), &text).map_err(io)?;
        }
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<W> {
        self.builder.into_inner()
    }
}

/// The extension webdataset readers decode an image by, from its signature.
fn image_extension(bytes: &[u8]) -> &'static str {
    match bytes {
        [0xff, 0xd8, 0xff, ..] => "jpg",
        [0x89, b'P', b'N', b'G', ..] => "png",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "webp",
        [b'G', b'I', b'F', b'8', ..] => "gif",
        [b'B', b'M', ..] => "bmp",
        _ => "bin",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_into_key_and_field_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_member("00012.jpg"), Some(("00012", "jpg")));
        assert_eq!(split_member("a/b.c/00012.seg.png"), Some(("a/b.c/00012", "seg.png")));
        assert_eq!(split_member("README"), None);
        assert_eq!(split_member(".hidden"), None);
    }
}

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
use std::io::{Read, Seek, SeekFrom};
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

/// What [`read_samples`] does with a damaged part of a tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBad {
    /// An error naming the tar and the member's offset.
    Fail,
    /// The sample it is in is dropped and reading goes on at the next good header.
    Drop,
}

/// A part of a tar [`read_samples`] dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Where the damage is: the bad header's or member's offset.
    pub offset: u64,
    /// The sample dropped with it, if one was being read.
    pub sample: Option<String>,
    /// What is wrong, and where reading went on.
    pub what: String,
}

/// A sample being put together from its members.
struct Building {
    key: String,
    record: Map<String, Value>,
    /// Why it is dropped, once a member of it was bad (with [`OnBad::Drop`]).
    bad: Option<(u64, String)>,
}

/// Reads the samples of the tar at `path` in order, handing each to `sample`. `name` is how
/// records refer to the tar (relative to the dataset's root). A malformed tar (a bad header, a
/// truncated member, a `.json` member that is not JSON, a sample with two members of one
/// field) is an error naming it and the offset of the member that is bad, or with
/// [`OnBad::Drop`] the sample is dropped, reading goes on at the next valid header (a header's
/// checksum tells one), and what was dropped is returned.
pub fn read_samples(
    path: &Path,
    name: &str,
    on_bad: OnBad,
    mut sample: impl FnMut(Map<String, Value>) -> Result<(), StageError>,
) -> Result<Vec<Dropped>, StageError> {
    let bad = |offset: u64, what: &str| {
        StageError::input(format!("{}: {what} (the member at offset {offset})", path.display())).with_hint(
            "the tar is damaged or truncated: write it again, leave it out of `path`, or set \
             on_bad_record = \"drop\" to skip what is damaged",
        )
    };
    let io = |e: std::io::Error| StageError::input(format!("cannot read {}: {e}", path.display()));
    let file = File::open(path).map_err(|e| StageError::input(format!("cannot open {}: {e}", path.display())))?;
    let length = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let mut dropped = Vec::new();
    let mut current: Option<Building> = None;
    // Hands the finished sample on, or drops it if one of its members was bad.
    let mut finish = |done: Option<Building>, dropped: &mut Vec<Dropped>| -> Result<(), StageError> {
        match done {
            Some(Building { bad: None, record, .. }) => sample(record),
            Some(Building { bad: Some((offset, what)), key, .. }) => {
                dropped.push(Dropped { offset, sample: Some(key), what });
                Ok(())
            }
            None => Ok(()),
        }
    };
    // Where reading starts: 0, then past each damaged part.
    let mut start = 0u64;
    // The sample a bad header cut: its members after the damage are not a sample of their own.
    let mut lost: Option<String> = None;
    'segments: loop {
        let mut archive = tar::Archive::new(FromOffset::at(file.try_clone().map_err(io)?, start).map_err(io)?);
        let entries = archive.entries_with_seek().map_err(|e| bad(start, &format!("not a tar: {e}")))?;
        // Where the next header should be: what an error points at when the tar crate gives none.
        let mut next_header = start;
        for entry in entries {
            let mut entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    if on_bad == OnBad::Fail {
                        return Err(bad(next_header, &format!("bad tar header: {e}")));
                    }
                    let resumed_at = next_valid_header(&file, next_header + 512, length).map_err(io)?;
                    let what = match resumed_at {
                        Some(at) => format!("bad tar header ({e}); read on at the next good one, at offset {at}"),
                        None => format!("bad tar header ({e}); no good header after it"),
                    };
                    lost = current.take().map(|b| b.key);
                    dropped.push(Dropped { offset: next_header, sample: lost.clone(), what });
                    match resumed_at {
                        Some(at) => {
                            start = at;
                            continue 'segments;
                        }
                        None => break 'segments,
                    }
                }
            };
            let header_at = start + entry.raw_header_position();
            let data_at = start + entry.raw_file_position();
            let size = entry.size();
            next_header = data_at + size.div_ceil(512) * 512;
            let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if data_at + size > length {
                if on_bad == OnBad::Fail {
                    return Err(bad(header_at, &format!("member `{member}` is truncated")));
                }
                let what = format!("member `{member}` is truncated: the tar ends there");
                let key = split_member(&member).map(|(k, _)| k.to_string());
                // The sample before it is whole unless the member is one of its own.
                if current.as_ref().is_some_and(|b| Some(&b.key) != key.as_ref()) {
                    finish(current.take(), &mut dropped)?;
                }
                let lost = current.take().map(|b| b.key).or(key);
                dropped.push(Dropped { offset: header_at, sample: lost, what });
                break 'segments;
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let Some((key, field)) = split_member(&member) else { continue };
            if lost.as_deref() == Some(key) {
                continue;
            }
            lost = None;
            let field = field.to_ascii_lowercase();
            if current.as_ref().is_none_or(|b| b.key != key) {
                finish(current.take(), &mut dropped)?;
                let mut record = Map::new();
                record.insert("__key__".into(), Value::String(key.to_string()));
                current = Some(Building { key: key.to_string(), record, bad: None });
            }
            let building = current.as_mut().expect("set above");
            if building.bad.is_some() {
                continue;
            }
            let value = match member_value(&mut entry, &member, &field, name, data_at, size, &building.record) {
                Ok(value) => value,
                Err(what) if on_bad == OnBad::Drop => {
                    building.bad = Some((header_at, what));
                    continue;
                }
                Err(what) => return Err(bad(header_at, &what)),
            };
            building.record.insert(field, value);
        }
        break;
    }
    finish(current.take(), &mut dropped)?;
    Ok(dropped)
}

/// A file read from `base` on, as if it started there: the tar crate takes the positions a
/// seek returns for its own, so a tar read from the middle of a file must see them from 0.
struct FromOffset {
    file: File,
    base: u64,
}

impl FromOffset {
    fn at(mut file: File, base: u64) -> std::io::Result<FromOffset> {
        file.seek(SeekFrom::Start(base))?;
        Ok(FromOffset { file, base })
    }
}

impl Read for FromOffset {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for FromOffset {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let pos = match pos {
            SeekFrom::Start(n) => SeekFrom::Start(self.base + n),
            other => other,
        };
        Ok(self.file.seek(pos)? - self.base)
    }
}

/// A member's value in its sample's record: text as a string (`json` parsed), binary as a
/// reference into the tar; an error says what is wrong with it.
fn member_value(
    entry: &mut impl Read,
    member: &str,
    field: &str,
    name: &str,
    data_at: u64,
    size: u64,
    record: &Map<String, Value>,
) -> Result<Value, String> {
    if record.contains_key(field) {
        let key = record.get("__key__").and_then(Value::as_str).unwrap_or_default();
        return Err(format!("sample `{key}` has two `{field}` members"));
    }
    let reference = || {
        let mut r = Map::new();
        r.insert("tar".into(), Value::String(name.to_string()));
        r.insert("offset".into(), data_at.into());
        r.insert("length".into(), size.into());
        Value::Object(r)
    };
    let extension = field.rsplit('.').next().unwrap_or(field);
    if BINARY_EXTENSIONS.contains(&extension) {
        return Ok(reference());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut bytes).map_err(|e| format!("cannot read `{member}`: {e}"))?;
    Ok(match (extension, String::from_utf8(bytes)) {
        ("json", Ok(text)) => serde_json::from_str(&text).map_err(|e| format!("`{member}` is not valid JSON: {e}"))?,
        (_, Ok(text)) => Value::String(text),
        (_, Err(_)) => reference(),
    })
}

/// The offset of the first 512-byte block at or after `from` (a multiple of 512) that is a
/// valid tar header: its checksum field matches its bytes. `None` when none is left.
fn next_valid_header(file: &File, from: u64, length: u64) -> std::io::Result<Option<u64>> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file.try_clone()?);
    reader.seek(SeekFrom::Start(from))?;
    let mut block = [0u8; 512];
    let mut at = from;
    while at + 512 <= length {
        reader.read_exact(&mut block)?;
        if is_header(&block) {
            return Ok(Some(at));
        }
        at += 512;
    }
    Ok(None)
}

/// Whether a block is a tar header: not all zeros, and its checksum (octal, at 148..156) is the
/// sum of its bytes with the checksum field counted as spaces.
fn is_header(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let text: String = field.iter().map(|&b| b as char).filter(|c| c.is_digit(8)).collect();
    let Ok(stored) = u32::from_str_radix(&text, 8) else { return false };
    let sum: u32 = block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u32 }).sum();
    block.iter().any(|&b| b != 0) && stored == sum
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

#[cfg(test)]
mod damaged_tars {
    use super::*;

    /// Three samples (`k0`..`k2`: a 700-byte `jpg`, a `txt`, a `json`), the header of member
    /// `bad` (if any) with a wrong checksum, cut to `cut` bytes (if any).
    fn tar(bad: Option<usize>, cut: Option<usize>) -> (tempfile::TempDir, std::path::PathBuf, Vec<u64>) {
        let mut builder = tar::Builder::new(Vec::new());
        for k in 0..3 {
            for (ext, data) in
                [("jpg", vec![0xffu8; 700]), ("txt", b"hello".to_vec()), ("json", b"{\"i\": 1}".to_vec())]
            {
                let mut h = tar::Header::new_ustar();
                h.set_size(data.len() as u64);
                h.set_mode(0o444);
                h.set_cksum();
                builder.append_data(&mut h, format!("k{k}.{ext}"), data.as_slice()).unwrap();
            }
        }
        let mut bytes = builder.into_inner().unwrap();
        // Header offsets: each member is a header and its data, padded to 512.
        let mut headers = Vec::new();
        let mut at = 0usize;
        for _ in 0..9 {
            headers.push(at as u64);
            let size = usize::from_str_radix(
                std::str::from_utf8(&bytes[at + 124..at + 135]).unwrap().trim_matches(|c| c == '\0' || c == ' '),
                8,
            )
            .unwrap();
            at += 512 + size.div_ceil(512) * 512;
        }
        if let Some(m) = bad {
            bytes[headers[m] as usize + 148] ^= 1;
        }
        if let Some(n) = cut {
            bytes.truncate(n);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tar");
        std::fs::write(&path, bytes).unwrap();
        (dir, path, headers)
    }

    fn keys(path: &Path, on_bad: OnBad) -> Result<(Vec<String>, Vec<Dropped>), StageError> {
        let mut keys = Vec::new();
        let dropped = read_samples(path, "t.tar", on_bad, |r| {
            keys.push(r["__key__"].as_str().unwrap().to_string());
            Ok(())
        })?;
        Ok((keys, dropped))
    }

    #[test]
    fn a_bad_header_drops_its_sample_and_reading_goes_on_at_the_next_good_header() {
        let (_d, path, headers) = tar(Some(1), None);
        let e = keys(&path, OnBad::Fail).unwrap_err().to_string();
        assert!(e.contains(&format!("offset {}", headers[1])), "{e}");
        let (got, dropped) = keys(&path, OnBad::Drop).unwrap();
        assert_eq!(got, ["k1", "k2"], "k0.json, after the damage, is no sample of its own");
        assert_eq!(dropped.len(), 1);
        assert_eq!((dropped[0].offset, dropped[0].sample.as_deref()), (headers[1], Some("k0")));
        assert!(dropped[0].what.contains(&format!("at offset {}", headers[2])), "{}", dropped[0].what);
    }

    #[test]
    fn a_truncated_member_drops_its_sample_and_keeps_the_whole_ones_before_it() {
        let (_d, path, headers) = tar(None, Some(headers_of_k1_jpg() + 512 + 100));
        let e = keys(&path, OnBad::Fail).unwrap_err().to_string();
        assert!(e.contains("is truncated") && e.contains(&format!("offset {}", headers[3])), "{e}");
        let (got, dropped) = keys(&path, OnBad::Drop).unwrap();
        assert_eq!(got, ["k0"]);
        assert_eq!((dropped[0].offset, dropped[0].sample.as_deref()), (headers[3], Some("k1")));
        // A bad last header, with nothing valid after it.
        let (_d, path, _) = tar(Some(8), None);
        let (got, dropped) = keys(&path, OnBad::Drop).unwrap();
        assert_eq!(got, ["k0", "k1"]);
        assert!(dropped[0].what.contains("no good header after it"), "{}", dropped[0].what);
    }

    /// Where k1.jpg's header is: three members of k0 (1536 + 512 + 512 + 512 + 512 bytes).
    fn headers_of_k1_jpg() -> usize {
        tar(None, None).2[3] as usize
    }
}

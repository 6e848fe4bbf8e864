//! Which files a `read` stage reads, and how each is encoded.
//!
//! Corpora reach a data team as many files: img2dataset's `shards/{00000..00127}.tar`, a folder
//! of Parquet shards, a Hugging Face datasets folder (`data/train-00000-of-00004.parquet`), or a
//! few JSONL files named by hand. `path` takes any of them (a file, a glob, a brace range, a
//! folder, or a list of those) and they become one dataset, in a stable order: a list in the
//! order written, each glob or folder sorted by name, a brace range in its own order (which is
//! name order, as its numbers are zero-padded).

use std::path::{Path, PathBuf};

/// How a data file's records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Json,
    Parquet,
    /// Tars of samples (`KEY.jpg`, `KEY.txt`, ...), as img2dataset and `webdataset` write them.
    WebDataset,
}

/// How a text data file is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Format {
    pub fn from_name(s: &str) -> Option<Format> {
        match s {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "parquet" => Some(Format::Parquet),
            "webdataset" | "tar" => Some(Format::WebDataset),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Json => "json",
            Format::Parquet => "parquet",
            Format::WebDataset => "webdataset",
        }
    }

    /// The format and compression a file's name says (`a.jsonl.gz`: JSONL, gzip). Parquet
    /// compresses inside the file, so `.parquet.gz` says nothing ladle reads.
    pub fn from_path(path: &Path) -> Option<(Format, Compression)> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        let (stem, compression) = match name.rsplit_once('.')? {
            (stem, "gz") => (stem, Compression::Gzip),
            (stem, "zst" | "zstd") => (stem, Compression::Zstd),
            _ => (name.as_str(), Compression::None),
        };
        let format = Format::from_name(stem.rsplit_once('.')?.1)?;
        let compressible = matches!(format, Format::Jsonl | Format::Json);
        (compressible || compression == Compression::None).then_some((format, compression))
    }
}

/// Whether `path` names a file `read` can read (by its name).
pub fn is_data_file(path: &Path) -> bool {
    Format::from_path(path).is_some()
}

/// The files `specs` name, in reading order, each resolved against `base`. `split` picks a
/// Hugging Face datasets folder's split. Errors say which spec matched nothing, or which file
/// of a brace range is missing.
pub fn expand(base: &Path, specs: &[String], split: &str) -> Result<Vec<PathBuf>, String> {
    let mut out: Vec<PathBuf> = Vec::new();
    for spec in specs {
        let resolve = |s: &str| {
            let p = Path::new(s);
            if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
        };
        let files = if spec.contains('{') {
            let mut files = Vec::new();
            for name in expand_braces(spec)? {
                let path = resolve(&name);
                if !path.is_file() {
                    return Err(format!("`{name}` (from `{spec}`) does not exist ({})", path.display()));
                }
                files.push(path);
            }
            files
        } else if spec.contains(['*', '?', '[']) {
            let pattern = resolve(spec);
            let matches =
                glob::glob(&pattern.to_string_lossy()).map_err(|e| format!("`{spec}` is not a valid glob: {e}"))?;
            let mut files: Vec<PathBuf> = matches.filter_map(Result::ok).filter(|p| p.is_file()).collect();
            files.sort();
            if files.is_empty() {
                return Err(format!("`{spec}` matches no file"));
            }
            files
        } else {
            let path = resolve(spec);
            if path.is_dir() {
                folder_files(&path, split).map_err(|e| format!("`{spec}`: {e}"))?
            } else if path.is_file() {
                vec![path]
            } else {
                return Err(format!("`{spec}` does not exist ({})", path.display()));
            }
        };
        for f in files {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// A folder's data files: a Hugging Face datasets folder's split (`data/{split}-*`), else the
/// data files directly inside it, sorted by name.
fn folder_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>, String> {
    let list = |d: &Path| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_data_file(p))
            .collect();
        files.sort();
        files
    };
    let hf = dir.join("data");
    if hf.is_dir() {
        let of_split: Vec<PathBuf> = list(&hf)
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with(&format!("{split}-")) || name.starts_with(&format!("{split}."))
            })
            .collect();
        if !of_split.is_empty() {
            return Ok(of_split);
        }
    }
    let files = list(dir);
    if files.is_empty() {
        return Err(format!(
            "no data files in this folder (.jsonl, .json, .parquet, optionally .gz or .zst; .tar), and no `data/{split}-*` files \
             of a Hugging Face datasets folder"
        ));
    }
    Ok(files)
}

/// Expands `{00000..00127}` (numbers, zero-padded to the first's width) and `{a,b,c}`, every
/// such group of `spec`, in order.
pub fn expand_braces(spec: &str) -> Result<Vec<String>, String> {
    let Some(open) = spec.find('{') else { return Ok(vec![spec.to_string()]) };
    let close = spec[open..].find('}').map(|c| open + c).ok_or_else(|| format!("`{spec}`: a `{{` is never closed"))?;
    let (head, body, tail) = (&spec[..open], &spec[open + 1..close], &spec[close + 1..]);
    let choices: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi) = (a.parse::<u64>(), b.parse::<u64>());
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            return Err(format!("`{{{body}}}` in `{spec}` is not a range of numbers like {{00000..00127}}"));
        };
        if lo > hi {
            return Err(format!("`{{{body}}}` in `{spec}` runs backwards"));
        }
        if hi - lo >= 10_000_000 {
            return Err(format!("`{{{body}}}` in `{spec}` names more than 10 million files"));
        }
        let width = a.len();
        (lo..=hi).map(|n| format!("{n:0width$}")).collect()
    } else if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else {
        return Err(format!("`{{{body}}}` in `{spec}` is neither a range {{0..9}} nor a list {{a,b}}"));
    };
    let rests = expand_braces(tail)?;
    let mut out = Vec::with_capacity(choices.len() * rests.len());
    for c in &choices {
        for rest in &rests {
            out.push(format!("{head}{c}{rest}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_ranges_and_lists_expand_in_order_with_their_padding() {
        assert_eq!(
            expand_braces("s/{0008..0011}.tar").unwrap(),
            ["s/0008.tar", "s/0009.tar", "s/0010.tar", "s/0011.tar"]
        );
        assert_eq!(expand_braces("{a,b}-{1..2}.jsonl").unwrap(), ["a-1.jsonl", "a-2.jsonl", "b-1.jsonl", "b-2.jsonl"]);
        assert_eq!(expand_braces("plain.jsonl").unwrap(), ["plain.jsonl"]);
        for bad in ["s/{0..}.tar", "s/{3..1}.tar", "s/{x}.tar", "s/{0..2.tar"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_and_compression_come_from_the_name() {
        let f = |n: &str| Format::from_path(Path::new(n));
        assert_eq!(f("a.jsonl.gz"), Some((Format::Jsonl, Compression::Gzip)));
        assert_eq!(f("a.JSONL.ZST"), Some((Format::Jsonl, Compression::Zstd)));
        assert_eq!(f("a.json.gz"), Some((Format::Json, Compression::Gzip)));
        assert_eq!(f("train-00000-of-00002.parquet"), Some((Format::Parquet, Compression::None)));
        assert_eq!(f("a.parquet.gz"), None);
        assert_eq!(f("shards/00001.tar"), Some((Format::WebDataset, Compression::None)));
        assert_eq!(f("shards/00001.tar.gz"), None);
        assert_eq!(f("a.gz"), None);
        assert_eq!(f("notes.txt"), None);
    }

    #[test]
    fn globs_folders_and_hugging_face_layouts_list_their_files_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |rel: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "{}\n").unwrap();
        };
        for f in ["c.jsonl", "a.jsonl.gz", "b.parquet", "notes.txt"] {
            touch(&format!("flat/{f}"));
        }
        for f in ["train-00001-of-00002.parquet", "train-00000-of-00002.parquet", "test-00000-of-00001.parquet"] {
            touch(&format!("hf/data/{f}"));
        }
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files.iter().map(|p| p.strip_prefix(dir.path()).unwrap().to_string_lossy().to_string()).collect()
        };
        let ex = |specs: &[&str]| expand(dir.path(), &specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "train");
        assert_eq!(names(ex(&["flat"]).unwrap()), ["flat/a.jsonl.gz", "flat/b.parquet", "flat/c.jsonl"]);
        assert_eq!(names(ex(&["flat/*.jsonl*"]).unwrap()), ["flat/a.jsonl.gz", "flat/c.jsonl"]);
        assert_eq!(
            names(ex(&["hf"]).unwrap()),
            ["hf/data/train-00000-of-00002.parquet", "hf/data/train-00001-of-00002.parquet"]
        );
        let test = expand(dir.path(), &["hf".to_string()], "test").unwrap();
        assert_eq!(names(test), ["hf/data/test-00000-of-00001.parquet"]);
        // A list keeps its order; a file named twice is read once.
        assert_eq!(
            names(ex(&["flat/c.jsonl", "flat/b.parquet", "flat/c.jsonl"]).unwrap()),
            ["flat/c.jsonl", "flat/b.parquet"]
        );
        assert!(ex(&["flat/*.tar"]).unwrap_err().contains("matches no file"));
        assert!(
            ex(&["hf/data/train-{00000..00002}-of-00002.parquet"])
                .unwrap_err()
                .contains("train-00002-of-00002.parquet")
        );
        assert!(ex(&["missing.jsonl"]).unwrap_err().contains("does not exist"));
    }
}

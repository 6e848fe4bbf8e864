//! WebDataset tars in (issue #14): records as Python's own `tarfile` groups them, images read in
//! place from the tar (scored exactly as the same images read from files), the tar's digest in
//! the shard keys, and a damaged tar named with the member's offset.

mod common;

use std::process::Command;

use common::{Project, expected, points_tiny};
use serde_json::Value;

/// Builds shards/{00000..00002}.tar from data/captions.jsonl and the images it names, 14
/// samples a tar: KEY.<image ext> (missing for r007), KEY.txt, KEY.json.
const MAKE_TARS: &str = r#"
import io, json, sys, tarfile
records = [json.loads(l) for l in open("data/captions.jsonl")]
skip_image = sys.argv[1] if len(sys.argv) > 1 else ""
for t in range(3):
    with tarfile.open(f"shards/{t:05}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, r in enumerate(records[14 * t : 14 * (t + 1)]):
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 1700000000
                tar.addfile(info, io.BytesIO(data))
            if r["id"] != "r007":
                ext = r["image"].rsplit(".", 1)[1]
                image = r["image"] if r["id"] != skip_image else "images/img000.png"
                add(f"{r['id']}.{ext}", open("data/" + image, "rb").read())
            add(f"{r['id']}.txt", r["caption"].encode())
            add(f"{r['id']}.json", json.dumps({"id": r["id"], "position": 14 * t + i}).encode())
"#;

/// The reference reader: `tarfile`, members grouped by key as webdataset groups them (the key
/// is the name up to the first dot), images as (tar, offset, length).
const REFERENCE: &str = r#"
import json, sys, tarfile
for name in sys.argv[1:]:
    sample = None
    with tarfile.open("shards/" + name) as tar:
        for m in tar.getmembers():
            key, field = m.name.split(".", 1)
            if sample is None or sample["__key__"] != key:
                if sample: print(json.dumps(sample))
                sample = {"__key__": key}
            if field in ("jpg", "png", "webp"):
                sample[field] = {"tar": name, "offset": m.offset_data, "length": m.size}
            else:
                data = tar.extractfile(m).read().decode()
                sample[field] = json.loads(data) if field == "json" else data
    if sample: print(json.dumps(sample))
"#;

fn python(p: &Project, script: &str, args: &[&str]) -> String {
    let out = Command::new("python3").arg("-c").arg(script).args(args).current_dir(p.dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The fixture captions and images under data/, with r004's image as a lossless WebP.
fn project() -> Project {
    let p = Project::new();
    let captions = std::fs::read_to_string(points_tiny().join("captions.jsonl")).unwrap();
    for entry in std::fs::read_dir(points_tiny().join("images")).unwrap() {
        let entry = entry.unwrap();
        p.write(&format!("data/images/{}", entry.file_name().to_string_lossy()), std::fs::read(entry.path()).unwrap());
    }
    let png = image::open(p.path("data/images/img004.png")).unwrap().to_rgb8();
    png.save_with_format(p.path("data/images/img004.webp"), image::ImageFormat::WebP).unwrap();
    p.write("data/captions.jsonl", captions.replace("images/img004.png", "images/img004.webp"));
    std::fs::create_dir_all(p.path("shards")).unwrap();
    python(&p, MAKE_TARS, &[]);
    p
}

fn scoring(data: &str, text: &str, image: &str) -> String {
    let prompt = expected()["prompt"].as_str().unwrap().to_string();
    format!(
        r#"[pipeline]
name = "wds"

[stages.captions]
kind = "read"
path = "{data}"
shard_records = 8

[stages.scorer]
kind = "model"
path = "{}"

[stages.ppl]
kind = "perplexity"
data = "captions"
model = "scorer"
text = "{text}"
prompt = "{prompt}"
image = "{image}"
on_bad_image = "drop"

[stages.scored]
kind = "write"
data = "ppl"
path = "scored.jsonl"
"#,
        points_tiny().join("tiny-llava").display()
    )
}

fn ppl_by(records: &[Value], key: &str) -> std::collections::BTreeMap<String, f64> {
    records.iter().map(|r| (r[key].as_str().unwrap().to_string(), r["ppl"].as_f64().unwrap())).collect()
}

#[test]
fn tars_read_as_tarfile_groups_them_and_their_images_score_as_the_same_files_do() {
    let p = project();
    // The records, against the reference reader's.
    p.write(
        "read.toml",
        "[pipeline]\nname = \"r\"\n[stages.d]\nkind = \"read\"\npath = \"shards/{00000..00002}.tar\"\n\
         [stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"records.jsonl\"\n",
    );
    let r = p.run("read.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let got = p.jsonl("records.jsonl");
    let want: Vec<Value> = python(&p, REFERENCE, &["00000.tar", "00001.tar", "00002.tar"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 42);
    assert_eq!(got, want);
    assert!(got.iter().any(|r| r.get("webp").is_some()) && got.iter().any(|r| r.get("jpg").is_some()));
    assert!(got.iter().find(|r| r["__key__"] == "r007").is_some_and(|r| r.get("png").is_none()));

    // Scored from the tars, in place: the perplexities the image files give, to the last digit.
    p.write("tars.toml", scoring("shards/{00000..00002}.tar", "{txt}", "{jpg;png;webp}"));
    let tars = p.run("tars.toml", &[]);
    assert_eq!(tars.code(), 0, "{}", tars.stderr());
    assert_eq!(tars.stage("ppl")["dropped_on_error"], 1, "r007 has no image: {}", tars.summary());
    let from_tars = ppl_by(&p.jsonl("scored.jsonl"), "__key__");
    p.write("files.toml", scoring("data/captions.jsonl", "{caption}", "{image}"));
    let files = p.run("files.toml", &[]);
    assert_eq!(files.code(), 0, "{}", files.stderr());
    let mut from_files = ppl_by(&p.jsonl("scored.jsonl"), "id");
    from_files.remove("r007");
    assert_eq!(from_tars, from_files);
    // No image byte went into the store: its records only point into the tars.
    let store_bytes: u64 = walk(&p.path(".ladle/objects"));
    let image_bytes: u64 = walk(&p.path("data/images"));
    assert!(store_bytes < image_bytes / 4, "store {store_bytes} B vs images {image_bytes} B");

    // A tar rewritten with another image for r015 (tar 1): only tar 1's shards are scored again.
    python(&p, MAKE_TARS, &["r015"]);
    let again = p.run("tars.toml", &[]);
    assert_eq!(again.code(), 0, "{}", again.stderr());
    assert_eq!(again.stage("captions")["shards_computed"], 1, "one tar read again: {}", again.summary());
    assert_eq!(again.computed("ppl"), 2, "tar 1's two shards");
    let rescored = ppl_by(&p.jsonl("scored.jsonl"), "__key__");
    assert_ne!(rescored["r015"], from_tars["r015"]);
    assert_eq!(rescored["r016"], from_tars["r016"]);
}

fn walk(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    total
}

#[test]
fn a_truncated_or_damaged_tar_is_an_error_naming_it_and_the_member_offset() {
    let p = project();
    let tar = p.read("shards/00001.tar");
    p.write("p.toml", "[pipeline]\nname = \"r\"\n[stages.d]\nkind = \"read\"\npath = \"shards\"\n");
    // Cut inside the first member's data (an image of a few KB).
    p.write("shards/00001.tar", &tar[..3 * 512 + 700]);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let error = r.stage("d")["error"].as_str().unwrap().to_string();
    assert!(error.contains("00001.tar") && error.contains("is truncated") && error.contains("offset 0"), "{error}");
    // The second member's header with a wrong checksum: it sits after the first member's data,
    // whose size is octal in the first header.
    let size = tar[124..136].iter().take_while(|b| b.is_ascii_digit()).fold(0usize, |n, b| n * 8 + (b - b'0') as usize);
    let second = 512 + size.div_ceil(512) * 512;
    let mut bad = tar.clone();
    bad[second + 148] ^= 0x01;
    p.write("shards/00001.tar", &bad);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let error = r.stage("d")["error"].as_str().unwrap().to_string();
    assert!(error.contains("00001.tar") && error.contains(&format!("offset {second}")), "{error}");
}

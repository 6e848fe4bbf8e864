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

/// The offsets of a ustar archive's member headers: each is 512 bytes, its size octal at 124,
/// its data padded to 512 bytes.
fn headers(tar: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|b| *b != 0) {
        out.push(at);
        let size = tar[at + 124..at + 136]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0, |n, b| n * 8 + (b - b'0') as usize);
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

/// `tar` with the header at `at` failing its checksum.
fn with_bad_checksum(tar: &[u8], at: usize) -> Vec<u8> {
    let mut bad = tar.to_vec();
    bad[at + 148] ^= 0x01;
    bad
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
    // The second member's header with a wrong checksum.
    let second = headers(&tar)[1];
    p.write("shards/00001.tar", with_bad_checksum(&tar, second));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let error = r.stage("d")["error"].as_str().unwrap().to_string();
    assert!(error.contains("00001.tar") && error.contains(&format!("offset {second}")), "{error}");
}

#[test]
fn with_on_bad_record_drop_a_damaged_sample_is_skipped_counted_and_logged_and_reading_goes_on() {
    let p = project();
    let tar = p.read("shards/00001.tar");
    let pipeline = "[pipeline]\nname = \"r\"\n[stages.d]\nkind = \"read\"\npath = \"shards\"\n\
                    on_bad_record = \"drop\"\n[stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"out.jsonl\"\n";
    p.write("p.toml", pipeline);
    let keys = |p: &Project| -> Vec<String> {
        p.jsonl("out.jsonl").iter().map(|r| r["__key__"].as_str().unwrap().to_string()).collect()
    };
    let all: Vec<String> = (0..42).map(|i| format!("r{i:03}")).collect();

    // r014's second member (its .txt) with a bad header: r014 is dropped, its .json after the
    // damage is not taken for a sample, and tar 1 reads on from r015.
    // The second member's header with a wrong checksum.
    let second = headers(&tar)[1];
    p.write("shards/00001.tar", with_bad_checksum(&tar, second));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("d")["dropped_on_error"], 1, "{}", r.summary());
    let want: Vec<String> = all.iter().filter(|k| *k != "r014").cloned().collect();
    assert_eq!(keys(&p), want);
    let show = String::from_utf8_lossy(&p.ladle(&["show", "p.toml", "d"]).stdout).to_string();
    assert!(show.contains(&format!("00001.tar at offset {second}: sample `r014`: bad tar header")), "{show}");

    // Cut inside r016's image: r014 and r015 are kept, the rest of tar 1 is gone.
    p.write("shards/00001.tar", &tar[..headers(&tar)[6] + 512 + 100]);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("d")["dropped_on_error"], 1, "{}", r.summary());
    let want: Vec<String> = all.iter().filter(|k| !("r016".."r028").contains(&k.as_str())).cloned().collect();
    assert_eq!(keys(&p), want);

    // A bad line of a JSONL file likewise, with its line number.
    p.write("lines.jsonl", "{\"a\": 1}\nnot json\n{\"a\": 3}\n");
    p.write("l.toml", pipeline.replace("path = \"shards\"", "path = \"lines.jsonl\""));
    let r = p.run("l.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("d")["dropped_on_error"], 1, "{}", r.summary());
    assert_eq!(p.jsonl("out.jsonl"), vec![serde_json::json!({"a": 1}), serde_json::json!({"a": 3})]);
    let show = String::from_utf8_lossy(&p.ladle(&["show", "l.toml", "d"]).stdout).to_string();
    assert!(show.contains("lines.jsonl:2: "), "{show}");
}

/// Checks the tars in a folder against the sources with Python's tarfile: every image member's
/// bytes are the image file's, every txt the caption. Prints {samples, per_tar, errors, ids}.
const CHECK_TARS: &str = r#"
import glob, json, sys, tarfile
captions = {}
for l in open("data/captions.jsonl"):
    r = json.loads(l)
    captions[r["id"]] = r
out = {"samples": 0, "per_tar": [], "errors": [], "ids": []}
for path in sorted(glob.glob(sys.argv[1] + "/*.tar")):
    samples = {}
    order = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if key not in samples:
                samples[key] = {}
                order.append(key)
            samples[key][ext] = tar.extractfile(m).read()
    out["per_tar"].append(len(order))
    for key in order:
        s = samples[key]
        meta = json.loads(s["json"]) if "json" in s else {}
        rid = key if key in captions else meta.get("id")
        out["ids"].append(rid)
        out["samples"] += 1
        src = captions.get(rid)
        if src is None:
            out["errors"].append(f"{key}: no source record"); continue
        if s.get("txt", b"").decode() != src["caption"]:
            out["errors"].append(f"{key}: txt differs")
        images = [e for e in s if e in ("jpg", "png", "webp")]
        if rid == "r007" and not images and "image_missing_ok" in sys.argv:
            continue
        if len(images) != 1:
            out["errors"].append(f"{key}: image members {images}"); continue
        if s[images[0]] != open("data/" + src["image"], "rb").read():
            out["errors"].append(f"{key}: image bytes differ")
        if not src["image"].endswith("." + images[0]):
            out["errors"].append(f"{key}: .{images[0]} for {src['image']}")
print(json.dumps(out))
"#;

#[test]
fn what_a_filter_keeps_goes_back_out_as_tars_with_the_images_byte_identical() {
    let p = project();
    // From the tars: a sample of them, 10 samples a tar, images copied from the source tars.
    p.write(
        "out.toml",
        "[pipeline]\nname = \"out\"\n[stages.d]\nkind = \"read\"\npath = \"shards/{00000..00002}.tar\"\nshard_records = 8\n\
         [stages.some]\nkind = \"sample\"\ndata = \"d\"\nfraction = 0.7\nseed = 3\n\
         [stages.w]\nkind = \"write\"\ndata = \"some\"\npath = \"out/{shard:05}.tar\"\nsamples_per_tar = 10\n\
         [stages.kept]\nkind = \"write\"\ndata = \"some\"\npath = \"kept.jsonl\"\n",
    );
    let r = p.run("out.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let kept: Vec<String> = p.jsonl("kept.jsonl").iter().map(|r| r["__key__"].as_str().unwrap().to_string()).collect();
    let check: Value = serde_json::from_str(&python(&p, CHECK_TARS, &["out", "image_missing_ok"])).unwrap();
    assert_eq!(check["errors"], serde_json::json!([]), "{check}");
    assert_eq!(check["samples"].as_u64(), Some(kept.len() as u64));
    let ids: Vec<String> = check["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_string()).collect();
    assert_eq!(ids, kept, "the kept samples, in order");
    let per_tar: Vec<u64> = check["per_tar"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert!(per_tar[..per_tar.len() - 1].iter().all(|&n| n == 10) && *per_tar.last().unwrap() <= 10, "{per_tar:?}");
    // Rerun: nothing written again; the tars are the same bytes.
    let before = std::fs::read(p.path("out/00000.tar")).unwrap();
    let again = p.run("out.toml", &["--force", "w"]);
    assert_eq!(again.stage("w")["shards_computed"].as_u64(), Some(0), "{}", again.summary());
    assert_eq!(std::fs::read(p.path("out/00000.tar")).unwrap(), before);

    // From JSONL with image paths: a tar per shard, images read from the files.
    p.write(
        "files.toml",
        "[pipeline]\nname = \"files\"\n[stages.d]\nkind = \"read\"\npath = \"data/captions.jsonl\"\nshard_records = 16\n\
         [stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"out2/{shard:05}.tar\"\nimage = \"{image}\"\ntext = \"{caption}\"\n",
    );
    let r = p.run("files.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let check: Value = serde_json::from_str(&python(&p, CHECK_TARS, &["out2"])).unwrap();
    assert_eq!(check["errors"], serde_json::json!([]), "{check}");
    assert_eq!(check["per_tar"], serde_json::json!([16, 16, 10]));

    // An image rewritten in place (same path, same records): the tar holding it is written
    // again with the new bytes, the others are left alone.
    let second = std::fs::read(p.path("out2/00001.tar")).unwrap();
    let img = p.read("data/images/img003.png");
    p.write("data/images/img003.png", p.read("data/images/img000.png"));
    let r = p.run("files.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.status("w"), "ran", "{}", r.summary());
    assert_eq!(r.stage("w")["shards_computed"], 1, "one tar written again: {}", r.summary());
    let check: Value = serde_json::from_str(&python(&p, CHECK_TARS, &["out2"])).unwrap();
    assert_eq!(check["errors"], serde_json::json!([]), "the new bytes are in the tar: {check}");
    assert_eq!(std::fs::read(p.path("out2/00001.tar")).unwrap(), second);
    assert_ne!(img, p.read("data/images/img003.png"));
}

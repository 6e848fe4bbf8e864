//! Corpus-scale data in and out (issue #14): many files as one dataset (globs, brace ranges,
//! folders, Hugging Face datasets folders, lists), compressed JSONL in and out.

mod common;

use std::process::Command;

use common::{Project, captions};
use serde_json::Value;

const HEAD: &str = "[pipeline]\nname = \"corpus\"\n\n";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .args(["-c", "import gzip, sys; sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read()))"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out.stdout
}

/// Python's own gzip reader (an independent reference) on a file of the project.
fn gunzip(p: &Project, rel: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", "import gzip, sys; sys.stdout.buffer.write(gzip.open(sys.argv[1]).read())"])
        .arg(p.path(rel))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ids(records: &[Value]) -> Vec<u64> {
    records.iter().map(|r| r["id"].as_u64().unwrap()).collect()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// read (a glob of parts) → exec per_shard (tags each record) → write OUT.
fn pipeline(path: &str, out: &str) -> String {
    format!(
        "{HEAD}[stages.parts]\nkind = \"read\"\npath = {path}\nshard_records = 10\n\n\
         [stages.tagged]\nkind = \"exec\"\ndata = \"parts\"\nper_shard = true\n\
         command = [\"python3\", \"-c\", \"import json,sys\\nfor l in sys.stdin:\\n r=json.loads(l); r['tag']=1; print(json.dumps(r))\"]\n\n\
         [stages.out]\nkind = \"write\"\ndata = \"tagged\"\npath = \"{out}\"\n"
    )
}

#[test]
fn a_glob_of_plain_and_compressed_parts_reads_as_one_dataset_and_a_new_part_computes_only_its_shards() {
    let p = Project::new();
    p.write("data/part-0.jsonl", captions(0..25));
    p.write("data/part-1.jsonl.gz", gzip(captions(25..40).as_bytes()));
    p.write("p.toml", pipeline("\"data/part-*\"", "out.jsonl.gz"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    // 25 records → 3 shards, 15 → 2: no shard holds two files' records.
    assert_eq!(r.computed("tagged"), 5);
    let out = lines(&gunzip(&p, "out.jsonl.gz"));
    assert_eq!(ids(&out), (0..40).collect::<Vec<_>>(), "files in name order, records in file order");
    assert!(out.iter().all(|r| r["tag"] == 1));

    // A third part (zstd): the read reads only it, and only its shards are computed downstream.
    let zstd = {
        let plain = p.path("tmp.jsonl");
        std::fs::write(&plain, captions(40..52)).unwrap();
        p.write("q.toml", format!("{HEAD}[stages.r]\nkind = \"read\"\npath = \"tmp.jsonl\"\n[stages.w]\nkind = \"write\"\ndata = \"r\"\npath = \"z.jsonl.zst\"\n"));
        let w = p.run("q.toml", &[]);
        assert_eq!(w.code(), 0, "{}", w.stderr());
        p.read("z.jsonl.zst")
    };
    assert_eq!(&zstd[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    p.write("data/part-2.jsonl.zst", &zstd);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("parts")["shards_computed"], 1, "one file read: {}", r.summary());
    assert_eq!(r.stage("parts")["shards_total"], 3);
    assert_eq!(r.computed("tagged"), 2, "12 new records: 2 new shards");
    assert_eq!(ids(&lines(&gunzip(&p, "out.jsonl.gz"))), (0..52).collect::<Vec<_>>());

    // An edited part reruns only the shards it feeds.
    p.write("data/part-0.jsonl", captions(0..25).replace("caption number 3 ", "caption number three "));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.computed("tagged"), 1);

    // Nothing changed: nothing runs.
    let r = p.run("p.toml", &[]);
    assert!(r.statuses().iter().all(|s| s.ends_with("=cached")), "{:?}", r.statuses());
}

#[test]
fn brace_ranges_lists_and_folders_name_their_files_and_a_missing_one_is_an_error() {
    let p = Project::new();
    for (i, range) in [(0, 0..7), (1, 7..12), (2, 12..20)] {
        p.write(&format!("shards/{i:05}.jsonl"), captions(range));
    }
    p.write("p.toml", pipeline("\"shards/{00000..00002}.jsonl\"", "a.jsonl"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(ids(&p.jsonl("a.jsonl")), (0..20).collect::<Vec<_>>());

    // The same files as a folder and as a glob: the same dataset, so everything downstream is cached.
    for path in ["\"shards\"", "\"shards/*.jsonl\"", "[\"shards/00000.jsonl\", \"shards/0000[12].jsonl\"]"] {
        p.write("p.toml", pipeline(path, "a.jsonl"));
        let r = p.run("p.toml", &[]);
        assert_eq!(r.code(), 0, "{path}: {}", r.stderr());
        assert_eq!(r.status("tagged"), "cached", "{path}");
    }
    // A list keeps its order.
    p.write("p.toml", pipeline("[\"shards/00002.jsonl\", \"shards/00000.jsonl\"]", "b.jsonl"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(ids(&p.jsonl("b.jsonl")), (12..20).chain(0..7).collect::<Vec<_>>());

    p.write("p.toml", pipeline("\"shards/{00000..00003}.jsonl\"", "a.jsonl"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 2);
    assert!(
        r.stderr().contains("`shards/00003.jsonl` (from `shards/{00000..00003}.jsonl`) does not exist"),
        "{}",
        r.stderr()
    );
    assert!(r.stderr().contains("p.toml:"), "points at the pipeline file: {}", r.stderr());
}

#[test]
fn a_hugging_face_datasets_folder_reads_its_split() {
    let p = Project::new();
    p.write("src-0.jsonl", captions(0..30));
    p.write("src-1.jsonl", captions(30..45));
    p.write("test.jsonl", captions(100..103));
    // The layout `datasets` writes: data/{split}-NNNNN-of-NNNNN.parquet.
    let mut make = String::from(HEAD);
    for (name, src) in
        [("train-00000-of-00002", "src-0"), ("train-00001-of-00002", "src-1"), ("test-00000-of-00001", "test")]
    {
        make += &format!(
            "[stages.r_{n}]\nkind = \"read\"\npath = \"{src}.jsonl\"\n[stages.w_{n}]\nkind = \"write\"\ndata = \"r_{n}\"\npath = \"hf/data/{name}.parquet\"\n",
            n = name.replace('-', "_")
        );
    }
    p.write("make.toml", make);
    assert_eq!(p.run("make.toml", &[]).code(), 0);
    for (split, want) in [("", (0..45).collect::<Vec<u64>>()), ("split = \"test\"\n", (100..103).collect())] {
        p.write("p.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"hf\"\n{split}[stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"out.jsonl\"\n"));
        let r = p.run("p.toml", &[]);
        assert_eq!(r.code(), 0, "{}", r.stderr());
        let got = p.jsonl("out.jsonl");
        assert_eq!(ids(&got), want, "{split}");
        let source: Vec<Value> = lines(&captions(want[0] as usize..*want.last().unwrap() as usize + 1));
        assert_eq!(got, source, "records survive Parquet unchanged");
    }
}

#[test]
fn a_truncated_gzip_file_is_an_error_naming_it_and_its_last_good_line() {
    let p = Project::new();
    let whole = gzip(captions(0..2000).as_bytes());
    p.write("data/part-0.jsonl.gz", &whole[..whole.len() / 2]);
    p.write("p.toml", pipeline("\"data/*.jsonl.gz\"", "out.jsonl"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let error = r.stage("parts")["error"].as_str().unwrap().to_string();
    assert!(error.contains("part-0.jsonl.gz") && error.contains("the last whole one"), "{error}");
    assert!(!p.path("out.jsonl").exists());
}

#[test]
fn exec_takes_its_dataset_as_data_like_every_stage_with_the_same_key() {
    let p = Project::new();
    p.write("d.jsonl", captions(0..12));
    let body = |port: &str| {
        format!(
            "{HEAD}[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\n[stages.e]\nkind = \"exec\"\n{port}\nper_shard = true\ncommand = [\"cat\"]\n"
        )
    };
    p.write("p.toml", body("data = \"d\""));
    assert_eq!(p.run("p.toml", &[]).status("e"), "ran");
    p.write("p.toml", body("inputs = { data = \"d\" }"));
    assert_eq!(p.run("p.toml", &[]).status("e"), "cached", "the same stage, the same key");
    p.write("p.toml", body("data = \"d\"\ninputs = { data = \"d\" }"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr().contains("input port `data` is given twice"), "{}", r.stderr());
    // `ladle graph` ends its output with a newline.
    for format in ["dot", "mermaid"] {
        p.write("p.toml", body("data = \"d\""));
        let g = p.ladle(&["graph", "p.toml", "--format", format]);
        assert!(g.stdout.ends_with(b"\n") && !g.stdout.ends_with(b"\n\n"), "{format}");
    }
}

#[test]
fn a_sharded_write_makes_a_file_per_shard_and_rewrites_only_what_changed() {
    use std::os::unix::fs::MetadataExt;
    let p = Project::new();
    p.write("data/part-0.jsonl", captions(0..25));
    p.write("data/part-1.jsonl", captions(25..40));
    let body = |out: &str| {
        format!(
            "{HEAD}[stages.d]\nkind = \"read\"\npath = \"data/*.jsonl\"\nshard_records = 10\n\
             [stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"{out}\"\n"
        )
    };
    p.write("p.toml", body("out/part-{shard:05}.jsonl.gz"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(p.path(dir)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        v.sort();
        v
    };
    let parts: Vec<String> = (0..5).map(|i| format!("part-{i:05}.jsonl.gz")).collect();
    assert_eq!(names("out"), parts);
    let sizes: Vec<usize> = parts.iter().map(|f| lines(&gunzip(&p, &format!("out/{f}"))).len()).collect();
    assert_eq!(sizes, [10, 10, 5, 10, 5], "a file per shard; no shard spans two input files");
    let all: Vec<Value> = parts.iter().flat_map(|f| lines(&gunzip(&p, &format!("out/{f}")))).collect();
    assert_eq!(ids(&all), (0..40).collect::<Vec<_>>());
    let inode = |f: &str| std::fs::metadata(p.path(&format!("out/{f}"))).unwrap().ino();
    let before: Vec<u64> = parts.iter().map(|f| inode(f)).collect();

    // A new input file: its two shards are written; the other five files are not touched.
    p.write("data/part-2.jsonl", captions(40..52));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!((r.stage("w")["shards_computed"].as_u64(), r.stage("w")["shards_total"].as_u64()), (Some(2), Some(7)));
    assert_eq!(parts.iter().map(|f| inode(f)).collect::<Vec<_>>(), before, "unchanged files are left alone");
    assert_eq!(names("out").len(), 7);
    // Back to two files: the two extra parts are removed, the rest still untouched.
    std::fs::remove_file(p.path("data/part-2.jsonl")).unwrap();
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(names("out"), parts);
    assert_eq!(parts.iter().map(|f| inode(f)).collect::<Vec<_>>(), before);
    // A deleted output file is written again on the next run.
    std::fs::remove_file(p.path("out/part-00003.jsonl.gz")).unwrap();
    let r = p.run("p.toml", &[]);
    assert_eq!(r.stage("w")["shards_computed"].as_u64(), Some(1), "{}", r.summary());
    assert_eq!(names("out"), parts);

    // Parquet parts read back, as a folder, to the same records.
    p.write("p.toml", body("pq/part-{shard}.parquet"));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    assert_eq!(names("pq"), (0..5).map(|i| format!("part-{i}.parquet")).collect::<Vec<_>>());
    p.write("q.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"pq\"\n[stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"back.jsonl\"\n"));
    assert_eq!(p.run("q.toml", &[]).code(), 0);
    assert_eq!(p.jsonl("back.jsonl"), lines(&captions(0..40)));
}

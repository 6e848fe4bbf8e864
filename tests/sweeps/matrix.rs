//! Matrix stages and variables: one declaration, many stages; `--set` for a sweep; each stage
//! keyed only by the values it was filled with, so adding or removing a value reruns only what
//! it touches; mistakes reported where they were written.

use crate::common::{Project, captions};
use serde_json::Value;

const PIPELINE: &str = r#"[pipeline]
name = "bands"

[vars]
lows = [0, 300, 600]
unused = "x"

[stages.captions]
kind = "read"
path = "data.jsonl"
shard_records = 10

[stages.band]
kind = "select"
matrix = { lo = "${vars.lows}", hi = [700, 1000] }
data = "captions"
by = "score"
min = "${matrix.lo}"
max = "${matrix.hi}"

[stages.all]
kind = "concat"
data = "band"

[stages.wide]
kind = "concat"
data = ["band.*.1000"]

[stages.out]
kind = "write"
data = "all"
path = "out.jsonl"

[stages.out_wide]
kind = "write"
data = "wide"
path = "wide.jsonl"
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("data.jsonl", captions(0..95)).write("p.toml", PIPELINE);
    p
}

/// The ids the bands keep, band after band in `bands` order: the hand computation.
fn ids_in(bands: &[(i64, i64)]) -> Vec<i64> {
    let records: Vec<Value> = captions(0..95).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut ids = Vec::new();
    for &(lo, hi) in bands {
        for r in &records {
            let s = r["score"].as_i64().unwrap();
            if lo <= s && s <= hi {
                ids.push(r["id"].as_i64().unwrap());
            }
        }
    }
    ids
}

fn ids(p: &Project, file: &str) -> Vec<i64> {
    p.jsonl(file).iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

fn bands(lows: &[i64]) -> Vec<(i64, i64)> {
    lows.iter().flat_map(|&lo| [(lo, 700), (lo, 1000)]).collect()
}

#[test]
fn a_three_by_two_matrix_is_six_stages_and_adding_a_value_runs_only_the_new_ones() {
    let p = project();
    let plan = p.ladle(&["plan", "p.toml", "--json"]);
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    let names: Vec<String> = String::from_utf8_lossy(&plan.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["stage"].as_str().unwrap().to_string())
        .filter(|s| s.starts_with("band"))
        .collect();
    assert_eq!(names, ["band.0.700", "band.0.1000", "band.300.700", "band.300.1000", "band.600.700", "band.600.1000"]);

    let first = p.run("p.toml", &[]);
    assert_eq!(first.code(), 0, "{}", first.stderr());
    assert!(first.statuses().iter().all(|s| s.ends_with("=ran")), "{:?}", first.statuses());
    // `data = "band"` takes every expansion in order; `band.*.1000` the wide ones.
    assert_eq!(ids(&p, "out.jsonl"), ids_in(&bands(&[0, 300, 600])));
    assert_eq!(ids(&p, "wide.jsonl"), ids_in(&[(0, 1000), (300, 1000), (600, 1000)]));

    // A fourth value, from the command line: two new stages, their consumers, nothing else.
    let second = p.run("p.toml", &["--set", "lows=[0, 100, 300, 600]"]);
    assert_eq!(second.code(), 0, "{}", second.stderr());
    let ran: Vec<String> = second.statuses().into_iter().filter(|s| s.ends_with("=ran")).collect();
    assert_eq!(ran, ["band.100.700=ran", "band.100.1000=ran", "all=ran", "wide=ran", "out=ran", "out_wide=ran"]);
    assert_eq!(second.status("band.300.700"), "cached");
    assert_eq!(second.status("captions"), "cached");
    assert_eq!(ids(&p, "out.jsonl"), ids_in(&bands(&[0, 100, 300, 600])));

    // A value removed: every remaining band cached, the consumers rerun.
    let third = p.run("p.toml", &["--set", "lows=[0, 600]"]);
    assert_eq!(third.code(), 0, "{}", third.stderr());
    let ran: Vec<String> = third.statuses().into_iter().filter(|s| s.ends_with("=ran")).collect();
    assert_eq!(ran, ["all=ran", "wide=ran", "out=ran", "out_wide=ran"]);
    assert_eq!(ids(&p, "out.jsonl"), ids_in(&bands(&[0, 600])));

    // `show` names an expansion's values; the declared name alone lists the expansions.
    let show =
        String::from_utf8(p.ladle(&["show", "p.toml", "band.600.1000", "--set", "lows=[0, 600]"]).stdout).unwrap();
    assert!(show.contains("matrix:   lo = 600, hi = 1000 (of `band`)"), "{show}");
    let err = String::from_utf8(p.ladle(&["show", "p.toml", "band"]).stderr).unwrap();
    assert!(err.contains("`band` is a matrix of 6 stages in pipeline `bands`: band.0.700, band.0.1000,"), "{err}");

    // `graph` draws the expansions in one box per declaration.
    let dot = String::from_utf8(p.ladle(&["graph", "p.toml"]).stdout).unwrap();
    assert!(dot.contains("subgraph \"cluster_band\" {\n    label=\"band (matrix over lo × hi: 6 stages)\";"), "{dot}");
    // Each node names itself twice (id and label); six edges in, six to `all`, three to `wide`.
    assert_eq!(dot.matches("\"band.").count(), 2 * 6 + 6 + 6 + 3, "{dot}");
    let mermaid = String::from_utf8(p.ladle(&["graph", "p.toml", "--format", "mermaid"]).stdout).unwrap();
    assert!(mermaid.contains("  subgraph s_matrix__band[\"band (matrix over lo × hi: 6 stages)\"]\n    s_band_o_0_o_700[\"band.0.700 (select)\"]"), "{mermaid}");
}

#[test]
fn set_changes_only_what_the_variable_feeds_and_early_cutoff_holds() {
    let p = Project::new();
    p.write("data.jsonl", captions(0..95)).write(
        "p.toml",
        r#"[pipeline]
name = "sweep"

[vars]
min_score = 0
tag = "x"

[stages.captions]
kind = "read"
path = "data.jsonl"

[stages.keep]
kind = "select"
data = "captions"
by = "score"
min = "${vars.min_score}"

[stages.out]
kind = "write"
data = "keep"
path = "out-${vars.tag}.jsonl"
"#,
    );
    let first = p.run("p.toml", &[]);
    assert_eq!(first.code(), 0, "{}", first.stderr());
    assert_eq!(p.jsonl("out-x.jsonl").len(), 95);
    // The same value written differently (a float for the file's integer): the same key.
    let same = p.run("p.toml", &["--set", "min_score=0.0"]);
    assert_eq!(same.statuses(), ["captions=cached", "keep=cached", "out=cached"], "{}", same.stderr());
    // A threshold below every score: `keep` reruns and makes the same records; `out` stays.
    let below = p.run("p.toml", &["--set", "min_score=-5"]);
    assert_eq!(below.statuses(), ["captions=cached", "keep=ran", "out=cached"], "{}", below.stderr());
    // One that drops records: `keep` and `out` rerun.
    let higher = p.run("p.toml", &["--set", "min_score=500"]);
    assert_eq!(higher.statuses(), ["captions=cached", "keep=ran", "out=ran"], "{}", higher.stderr());
    let want = captions(0..95)
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["score"].as_i64().unwrap() >= 500)
        .count();
    assert_eq!(p.jsonl("out-x.jsonl").len(), want);
    // A string variable filling part of a path.
    let tagged = p.run("p.toml", &["--set", "tag=y", "--set", "min_score=500"]);
    assert_eq!(tagged.statuses(), ["captions=cached", "keep=cached", "out=ran"], "{}", tagged.stderr());
    assert_eq!(p.jsonl("out-y.jsonl").len(), want);

    // Mistakes on the command line name the variable and what it should be.
    let typo = p.ladle(&["run", "p.toml", "--set", "min_scor=1"]);
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(!typo.status.success());
    assert!(
        stderr.contains("declares no variable `min_scor`") && stderr.contains("did you mean `min_score`?"),
        "{stderr}"
    );
    let wrong = p.ladle(&["plan", "p.toml", "--set", "min_score=high"]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("variable `min_score` is an integer in") && stderr.contains("p.toml:5:1"), "{stderr}");
}

/// Each malformed matrix or variable gives one message at the file:line:column of what was
/// written (not of an expansion).
#[test]
fn malformed_matrices_and_variables_point_at_what_was_written() {
    let head = "[pipeline]\nname = \"m\"\n\n[stages.captions]\nkind = \"read\"\npath = \"data.jsonl\"\n\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "[stages.band]\nkind = \"select\"\nmatrix = { lo = [0, 300] }\ndata = \"captions\"\nby = \"score\"\nmin = \"${matrix.low}\"\n",
            "p.toml:13:1: stage `band`: unknown matrix axis `low` in `${matrix.low}`",
            "did you mean `${matrix.lo}`?",
        ),
        (
            "[stages.band]\nkind = \"select\"\nmatrix = {}\ndata = \"captions\"\nby = \"score\"\nmin = 0\n",
            "p.toml:10:1: stage `band`: `matrix` is empty",
            "AXIS = [value",
        ),
        (
            "[stages.band]\nkind = \"select\"\nmatrix = { lo = [] }\ndata = \"captions\"\nby = \"score\"\nmin = 0\n",
            "p.toml:10:12: stage `band`: matrix axis `lo` has no values",
            "at least one value",
        ),
        (
            "[stages.band]\nkind = \"select\"\nmatrix = { lo = [\"a/b\", \"a_b\"] }\ndata = \"captions\"\nby = \"score\"\nmin = 0\n",
            "p.toml:10:1: stage `band`: two combinations of the matrix make the same stage name `band.a_b`",
            "clash",
        ),
        (
            "[stages.keep]\nkind = \"select\"\ndata = \"captions\"\nby = \"score\"\nmin = \"${vars.min}\"\n",
            "p.toml:12:1: stage `keep`: unknown variable `min` in `${vars.min}`",
            "declare it in a [vars] table",
        ),
        (
            "[stages.keep]\nkind = \"select\"\ndata = \"captions\"\nby = \"score\"\nmin = \"${matrix.lo}\"\n",
            "p.toml:12:1: stage `keep`: `${matrix.lo}` is used, but this stage has no `matrix`",
            "matrix = { AXIS",
        ),
        (
            "[stages.band]\nkind = \"select\"\nmatrix = { lo = [0, 300] }\ndata = \"captions\"\nby = \"score\"\nmin = \"${matrix.lo}\"\n\n[stages.out]\nkind = \"write\"\ndata = \"band\"\npath = \"o.jsonl\"\n",
            "p.toml:17:1: stage `out`: input port `data` takes one stage, but `band` names 2: band.0, band.300",
            "data = \"band.0\"",
        ),
        (
            "[stages.all]\nkind = \"concat\"\ndata = [\"band.*\"]\n",
            "p.toml:10:9: stage `all`: input port `data`: the pattern `band.*` matches no stage",
            "",
        ),
        (
            "[stages.band]\nkind = \"select\"\nmatrix = { lo = [0, 300] }\ndata = \"captions\"\nby = \"score\"\nmin = \"--${matrix.lo}${vars.x\"\n",
            "p.toml:13:1: stage `band`: `${` is not closed",
            "$${",
        ),
        (
            "[stages.e]\nkind = \"exec\"\nmatrix = { lo = [0, 300] }\ncommand = [\"echo\", \"{matrix.lo}\"]\n",
            "p.toml:11:1: stage `e.0`: unknown placeholder `{matrix.lo}`",
            "written with a dollar: ${matrix.lo}",
        ),
    ];
    for (stages, want, hint) in cases {
        let p = Project::new();
        p.write("data.jsonl", captions(0..5)).write("p.toml", format!("{head}{stages}"));
        let out = p.ladle(&["plan", "p.toml"]);
        let stderr = p.redact(&String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{stages}");
        assert!(stderr.contains(want), "wanted {want:?} in:\n{stderr}");
        assert!(stderr.contains(hint), "wanted the hint {hint:?} in:\n{stderr}");
        assert_eq!(stderr.matches("error").count(), 1, "one error:\n{stderr}");
    }
    // [vars] that refer to each other are refused at the variable.
    let p = Project::new();
    p.write("p.toml", "[pipeline]\nname = \"m\"\n\n[vars]\na = \"1\"\nb = \"${vars.a}\"\n\n[stages.captions]\nkind = \"read\"\npath = \"d.jsonl\"\n");
    let stderr = p.redact(&String::from_utf8_lossy(&p.ladle(&["plan", "p.toml"]).stderr));
    assert!(stderr.contains("p.toml:6:1: variable `b` refers to another"), "{stderr}");
}

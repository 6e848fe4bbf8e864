//! `choose` and exec metrics: candidates made by a matrix of `exec` stages that report metrics,
//! chosen by each method as a hand computation chooses, the set fed to a stage downstream;
//! greedy forward selection evaluates only the sets it has not seen.

use std::collections::BTreeSet;

use crate::common::Project;

/// Writes `{out}/metrics.json` = {"acc": VALUE, "eval": {"acc": VALUE}} and `{out}/value.json`.
const MAKE: &str = r#"import json, os, sys
value, out = float(sys.argv[1]), sys.argv[2]
json.dump({"acc": value, "eval": {"acc": value}, "note": "made"}, open(os.path.join(out, "metrics.json"), "w"))
json.dump({"g": value}, open(os.path.join(out, "value.json"), "w"))
"#;

/// Scores a set: the sum of its members' g, less 2 per pair of members (so additions stop
/// paying off); counts its calls in calls.txt.
const EVAL: &str = r#"import json, os, sys
*members, out = sys.argv[1:]
g = [json.load(open(os.path.join(m, "value.json")))["g"] for m in members]
n = len(g)
json.dump({"score": sum(g) - 2 * n * (n - 1) / 2}, open(os.path.join(out, "metrics.json"), "w"))
with open("calls.txt", "a") as f:
    f.write(" ".join(str(x) for x in sorted(g)) + "\n")
"#;

/// The g of each input, in order, into {out}/chosen.json.
const COLLECT: &str = r#"import json, os, sys
*members, out = sys.argv[1:]
json.dump([json.load(open(os.path.join(m, "value.json")))["g"] for m in members], open(os.path.join(out, "chosen.json"), "w"))
"#;

fn project(pipeline: &str) -> Project {
    let p = Project::new();
    p.write("make.py", MAKE).write("eval.py", EVAL).write("collect.py", COLLECT).write("p.toml", pipeline);
    p
}

fn pipeline(values: &str, pick: &str) -> String {
    format!(
        r#"[pipeline]
name = "choose"

[vars]
values = {values}

[stages.ft]
kind = "exec"
matrix = {{ g = "${{vars.values}}" }}
command = ["python3", "make.py", "${{matrix.g}}", "{{out}}"]
deps = ["make.py"]
metrics = "metrics.json"

[stages.base]
kind = "exec"
command = ["python3", "make.py", "0.65", "{{out}}"]
deps = ["make.py"]
metrics = "metrics.json"

[stages.pick]
kind = "choose"
candidates = "ft"
{pick}

[stages.use]
kind = "exec"
inputs = {{ chosen = "pick" }}
command = ["python3", "collect.py", "{{in.chosen}}", "{{out}}"]
deps = ["collect.py"]
"#
    )
}

/// The g values `use` received from `pick`, in order.
/// `set`: the `--set` the run had (each command loads the file with its own).
fn chosen(p: &Project, set: &[&str]) -> Vec<f64> {
    let out = p.path("exported");
    let _ = std::fs::remove_dir_all(&out);
    let mut args = vec!["export", "p.toml", "use", "-o", out.to_str().unwrap()];
    args.extend_from_slice(set);
    let e = p.ladle(&args);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    serde_json::from_slice::<Vec<f64>>(&std::fs::read(out.join("chosen.json")).unwrap()).unwrap()
}

const VALUES: &str = "[0.61, 0.70, 0.66, 0.58]";

#[test]
fn better_than_and_top_keep_what_a_hand_computation_keeps() {
    // Against the baseline's 0.65: higher is better, then a margin, then lower is better; the
    // top two; a nested metric; and scores taken from other artifacts than the candidates.
    let cases: &[(&str, &[f64])] = &[
        ("better_than = \"base\"\nmetric = \"acc\"", &[0.70, 0.66]),
        ("better_than = \"base\"\nmetric = \"acc\"\nmargin = 0.02", &[0.70]),
        ("better_than = \"base\"\nmetric = \"acc\"\nhigher_is_better = false", &[0.61, 0.58]),
        ("top = 2\nmetric = \"eval.acc\"", &[0.70, 0.66]),
        ("top = 3\nmetric = \"acc\"\nhigher_is_better = false", &[0.61, 0.66, 0.58]),
        ("scores = \"ft\"\ntop = 1\nmetric = \"acc\"", &[0.70]),
    ];
    for (pick, want) in cases {
        let p = project(&pipeline(VALUES, pick));
        let run = p.run("p.toml", &[]);
        assert_eq!(run.code(), 0, "{pick}: {}", run.stderr());
        assert_eq!(chosen(&p, &[]), *want, "{pick}");
        // `show` lists the chosen set with each member's metrics, and the trace.
        let show = String::from_utf8(p.ladle(&["show", "p.toml", "pick"]).stdout).unwrap();
        assert!(show.contains(&format!("chosen:   {} artifact(s)", want.len())), "{show}");
        assert!(show.contains(&format!("{{\"acc\":{},", want[0])), "{show}");
    }
    // An exec stage's metrics are shown with its files.
    let p = project(&pipeline(VALUES, "better_than = \"base\"\nmetric = \"acc\""));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let show = String::from_utf8(p.ladle(&["show", "p.toml", "ft.0.7"]).stdout).unwrap();
    assert!(show.contains("metrics:  {\"acc\":0.7,\"eval\":{\"acc\":0.7},\"note\":\"made\"}"), "{show}");

    // Early cutoff: a candidate added that is not chosen leaves what uses the set cached.
    let again = p.run("p.toml", &["--set", "values=[0.61, 0.70, 0.66, 0.58, 0.5]"]);
    assert_eq!(again.code(), 0, "{}", again.stderr());
    assert_eq!(again.status("ft.0.5"), "ran");
    assert_eq!(again.status("pick"), "ran");
    assert_eq!(again.status("use"), "cached");
}

/// Greedy forward selection as written in the module docs, over sets scored by `score`; the
/// sets in the order it evaluates them.
fn forward(g: &[f64], score: impl Fn(&[f64]) -> f64) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut evaluated = vec![vec![]];
    let mut chosen: Vec<usize> = Vec::new();
    let mut current = score(&[]);
    loop {
        let mut best: Option<(usize, f64)> = None;
        for i in (0..g.len()).filter(|i| !chosen.contains(i)) {
            let mut set = chosen.clone();
            set.push(i);
            set.sort();
            let s = score(&set.iter().map(|&j| g[j]).collect::<Vec<_>>());
            evaluated.push(set);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        match best {
            Some((i, s)) if s > current => {
                chosen.push(i);
                current = s;
            }
            _ => break,
        }
    }
    chosen.sort();
    (chosen, evaluated)
}

fn set_score(g: &[f64]) -> f64 {
    let n = g.len() as f64;
    g.iter().sum::<f64>() - 2.0 * n * (n - 1.0) / 2.0
}

#[test]
fn forward_selection_adds_while_it_helps_and_evaluates_each_set_once() {
    let pick = r#"method = "forward"
metric = "score"
command = ["python3", "eval.py", "{set}", "{out}"]
deps = ["eval.py"]"#;
    let g = [3.0, 5.0, 2.0, 1.0];
    let p = project(&pipeline("[3, 5, 2, 1]", pick));
    let first = p.run("p.toml", &[]);
    assert_eq!(first.code(), 0, "{}", first.stderr());
    let (want, sets) = forward(&g, set_score);
    // By hand: {5} (5), then {3, 5} (8 - 2 = 6), then nothing beats 6: {3, 5, 2} is 10 - 6 = 4.
    assert_eq!(want, [0, 1]);
    assert_eq!(chosen(&p, &[]), [3.0, 5.0]);
    assert_eq!(first.stage("pick")["work_unit"], "evaluation(s)");
    assert_eq!(first.stage("pick")["shards_total"], sets.len() as u64);
    assert_eq!(first.computed("pick"), sets.len() as u64);
    let calls = String::from_utf8(p.read("calls.txt")).unwrap();
    assert_eq!(calls.lines().count(), sets.len(), "each set evaluated once:\n{calls}");

    // A fifth candidate: only the sets that hold it are evaluated.
    let g5 = [3.0, 5.0, 2.0, 1.0, 6.0];
    let again = p.run("p.toml", &["--set", "values=[3, 5, 2, 1, 6]"]);
    assert_eq!(again.code(), 0, "{}", again.stderr());
    let (want, sets5) = forward(&g5, set_score);
    // By hand: {6}, then {5, 6} (11 - 2 = 9), then {3, 5, 6} is 14 - 6 = 8: stop.
    assert_eq!(want, [1, 4]);
    assert_eq!(chosen(&p, &["--set", "values=[3, 5, 2, 1, 6]"]), [5.0, 6.0]);
    let seen: BTreeSet<Vec<usize>> = sets.into_iter().collect();
    let new = sets5.iter().filter(|s| !seen.contains(*s)).count();
    assert!(new < sets5.len());
    assert_eq!(again.stage("pick")["shards_total"], sets5.len() as u64);
    assert_eq!(again.computed("pick"), new as u64, "only the new sets are evaluated");
    let calls = String::from_utf8(p.read("calls.txt")).unwrap();
    assert_eq!(calls.lines().count(), seen.len() + new);
    let show =
        String::from_utf8(p.ladle(&["show", "p.toml", "pick", "--set", "values=[3, 5, 2, 1, 6]"]).stdout).unwrap();
    assert!(
        show.contains(&format!(
            "{} set(s) evaluated: {new} computed, {} from the cache",
            sets5.len(),
            sets5.len() - new
        )),
        "{show}"
    );
}

#[test]
fn malformed_choose_stages_and_missing_metrics_are_one_clear_error() {
    let cases: &[(&str, &str)] = &[
        ("metric = \"acc\"", "p.toml:20:9: stage `pick`: `choose` needs a rule"),
        ("metric = \"acc\"\ntop = 0", "p.toml:24:1: stage `pick`: `top` is 0; it must be 1 or more"),
        ("metric = \"acc\"\ntop = 1\nbetter_than = \"base\"", "`top` and `better_than` are two rules"),
        ("metric = \"acc\"\nmethod = \"forward\"", "p.toml:20:9: stage `pick`: missing parameter `command`"),
        (
            "metric = \"acc\"\nmethod = \"forward\"\ncommand = [\"x\", \"--set={set}\", \"{out}\"]",
            "p.toml:25:1: stage `pick`: `--set={set}`: {set} must be a whole argument",
        ),
        ("metric = \"acc\"\nbetter_than = \"base\"\nmargin = -1", "p.toml:25:1: stage `pick`: `margin` is -1"),
        ("metric = \"acc\"\nmethod = \"backward\"", "p.toml:24:1: stage `pick`: parameter `method` is \"backward\""),
    ];
    for (pick, want) in cases {
        let p = project(&pipeline(VALUES, pick));
        let out = p.ladle(&["plan", "p.toml"]);
        let stderr = p.redact(&String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{pick}");
        assert!(stderr.contains(want), "{pick}: wanted {want:?} in:\n{stderr}");
    }
    // At run time: a metric the candidates lack, and candidates without metrics.
    let p = project(&pipeline(VALUES, "better_than = \"base\"\nmetric = \"f1\""));
    let run = p.run("p.toml", &[]);
    assert_ne!(run.code(), 0);
    let error = run.stage("pick")["error"].as_str().unwrap().to_string();
    assert!(error.contains("has no metric `f1`; its metrics: acc, eval, note"), "{error}");
    let p = project(
        &pipeline(VALUES, "better_than = \"base\"\nmetric = \"acc\"")
            .replace("metrics = \"metrics.json\"\n\n[stages.base]", "\n[stages.base]"),
    );
    let run = p.run("p.toml", &[]);
    let error = run.stage("pick")["error"].as_str().unwrap().to_string();
    assert!(error.contains("candidate 0 (ft.0.61) is a folder that carries no metrics"), "{error}");
    // A chosen set of two fed to a port that takes one.
    let text = pipeline(VALUES, "better_than = \"base\"\nmetric = \"acc\"")
        + "\n[stages.one]\nkind = \"exec\"\ndata = \"pick\"\ncommand = [\"true\", \"{in.data}\"]\n";
    let p = project(&text);
    let run = p.run("p.toml", &[]);
    let error = run.stage("one")["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("input port `data` takes one artifact, but the chosen set connected to it holds 2"),
        "{error}"
    );
}

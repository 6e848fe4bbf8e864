//! The `soup` stage against the transformers-made fixtures (tests/fixtures/points-tiny/soup:
//! four fine-tunes of tiny-qwen2, ft1 sharded, ft3 a run that went wrong), POINTS' greedy soup
//! trace, the score cache, and bad ingredients.

mod common;

use std::path::{Path, PathBuf};

use common::Project;
use safetensors::SafeTensors;
use serde_json::Value;

fn soup_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/points-tiny/soup")
}

fn expected() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/points-tiny/expected.json");
    serde_json::from_str::<Value>(&std::fs::read_to_string(path).unwrap()).unwrap()["soup"].clone()
}

/// Model stages for `dirs` (named m0, m1, ...), the held-out captions, and a soup over them.
fn pipeline(dirs: &[PathBuf], soup: &str) -> String {
    let mut text = String::from("[pipeline]\nname = \"soup\"\n\n");
    for (i, d) in dirs.iter().enumerate() {
        text += &format!("[stages.m{i}]\nkind = \"model\"\npath = \"{}\"\n\n", d.display());
    }
    let models: Vec<String> = (0..dirs.len()).map(|i| format!("\"m{i}\"")).collect();
    text += &format!(
        "[stages.heldout]\nkind = \"read\"\npath = \"{}\"\n\n[stages.soup]\nkind = \"soup\"\nmodels = [{}]\n{soup}\n",
        soup_fixtures().join("heldout.jsonl").display(),
        models.join(", ")
    );
    text
}

fn ingredients() -> Vec<PathBuf> {
    (0..4).map(|i| soup_fixtures().join(format!("ft{i}"))).collect()
}

const GREEDY: &str = "method = \"greedy\"\neval = \"heldout\"\ntext = \"{caption}\"";

/// `soup` exported to `name`; returns the folder.
fn run_and_export(p: &Project, name: &str) -> PathBuf {
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let out = p.ladle(&["export", "p.toml", "soup", "-o", name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p.path(name)
}

/// Every tensor of `got` within one unit in the last place (f32) of `want`'s.
fn assert_within_one_ulp(got: &Path, want: &Path) {
    let (g, w) = (std::fs::read(got).unwrap(), std::fs::read(want).unwrap());
    let (g, w) = (SafeTensors::deserialize(&g).unwrap(), SafeTensors::deserialize(&w).unwrap());
    let mut names = w.names();
    names.sort();
    let mut got_names = g.names();
    got_names.sort();
    assert_eq!(got_names, names);
    let mut worst_ulps = 0i64;
    for name in names {
        let (a, b) = (g.tensor(name).unwrap(), w.tensor(name).unwrap());
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        for (x, y) in a.data().chunks_exact(4).zip(b.data().chunks_exact(4)) {
            let (x, y) = (i32::from_le_bytes(x.try_into().unwrap()), i32::from_le_bytes(y.try_into().unwrap()));
            worst_ulps = worst_ulps.max((x as i64 - y as i64).abs());
        }
    }
    assert!(worst_ulps <= 1, "a weight is {worst_ulps} ulps from the reference");
    eprintln!("{}: worst difference {worst_ulps} ulp", got.display());
}

#[test]
fn uniform_soup_equals_the_reference() {
    let p = Project::new();
    p.write("p.toml", pipeline(&ingredients(), "method = \"uniform\""));
    let dir = run_and_export(&p, "uniform");
    assert_within_one_ulp(&dir.join("model.safetensors"), &soup_fixtures().join("expected_uniform.safetensors"));
    // The best (here: the first) ingredient's config and tokenizer came along; soup.json says how.
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(soup_fixtures().join("ft0").join(f)).unwrap(),
            "{f}"
        );
    }
    let soup: Value = serde_json::from_slice(&std::fs::read(dir.join("soup.json")).unwrap()).unwrap();
    assert_eq!(soup["method"], "uniform");
    assert_eq!(soup["ingredients"].as_array().unwrap().len(), 4);
}

#[test]
fn greedy_soup_follows_points_algorithm_1_and_its_scores_match() {
    let exp = expected();
    let p = Project::new();
    p.write("p.toml", pipeline(&ingredients(), GREEDY));
    let dir = run_and_export(&p, "greedy");
    assert_within_one_ulp(&dir.join("model.safetensors"), &soup_fixtures().join("expected_greedy.safetensors"));
    let soup: Value = serde_json::from_slice(&std::fs::read(dir.join("soup.json")).unwrap()).unwrap();
    let trace = soup["greedy_trace"].as_array().unwrap();
    let want = exp["greedy_trace"].as_array().unwrap();
    assert_eq!(trace.len(), want.len());
    for (t, w) in trace.iter().zip(want) {
        assert_eq!(t["ingredient"], w["try"]);
        assert_eq!(t["kept"], w["kept"]);
        let (g, e) = (t["score"].as_f64().unwrap(), w["score"].as_f64().unwrap());
        assert!((g - e).abs() / e < 1e-4, "try {}: {g} vs transformers {e}", w["try"]);
    }
    for (i, e) in exp["single_heldout_ppl"].as_array().unwrap().iter().enumerate() {
        let (g, e) = (soup["ingredients"][i]["metric"].as_f64().unwrap(), e.as_f64().unwrap());
        assert!((g - e).abs() / e < 1e-4, "ingredient {i}: {g} vs {e}");
    }
    // ladle show prints the trace.
    let show = p.ladle(&["show", "p.toml", "soup"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("greedy: try ingredient 3:") && text.contains("not kept"), "{text}");
    assert!(text.contains("7 evaluated, 0 from the cache"), "{text}");

    // The soup is a model ladle itself runs: its held-out perplexity is the greedy pool's.
    let scored = p.path("scored");
    std::fs::create_dir_all(&scored).unwrap();
    let mut text = std::fs::read_to_string(p.path("p.toml")).unwrap();
    text += "\n[stages.ppl]\nkind = \"perplexity\"\ndata = \"heldout\"\nmodel = \"soup\"\ntext = \"{caption}\"\n";
    text += "\n[stages.scored]\nkind = \"write\"\ndata = \"ppl\"\npath = \"scored.jsonl\"\n";
    p.write("p.toml", text);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.status("soup"), "cached");
    let (mut nll, mut tokens) = (0.0, 0.0);
    for line in String::from_utf8(p.read("scored.jsonl")).unwrap().lines() {
        let rec: Value = serde_json::from_str(line).unwrap();
        let n = rec["ppl_tokens"].as_f64().unwrap();
        nll += rec["ppl_nll"].as_f64().unwrap() * n;
        tokens += n;
    }
    let (got, want) = ((nll / tokens).exp(), exp["greedy_heldout_ppl"].as_f64().unwrap());
    assert!((got - want).abs() / want < 1e-4, "the greedy soup's held-out perplexity {got} vs {want}");
}

/// ft0 with every weight scaled by `factor`: a fifth, different ingredient.
fn scaled_copy(dest: &Path, factor: f32) {
    scaled_model(&soup_fixtures().join("ft0"), dest, factor);
}

/// A copy of the single-file f32 model `src` with every weight scaled by `factor`.
fn scaled_model(src: &Path, dest: &Path, factor: f32) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let scaled: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let data = t
                .data()
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * factor).to_le_bytes())
                .collect();
            (n, data, t.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = scaled
        .iter()
        .map(|(n, d, s)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dest.join("model.safetensors")).unwrap();
}

fn log_counts(p: &Project) -> (usize, usize) {
    let show = p.ladle(&["show", "p.toml", "soup"]);
    let text = String::from_utf8_lossy(&show.stdout).to_string();
    let line = text.lines().find(|l| l.contains("evaluated")).unwrap_or_else(|| panic!("{text}")).to_string();
    let num = |word: &str| -> usize {
        let before = &line[..line.find(word).unwrap()];
        before.split_whitespace().last().unwrap().trim_start_matches(';').parse().unwrap()
    };
    (num("evaluated"), num("from the cache"))
}

#[test]
fn a_fifth_ingredient_evaluates_only_new_candidates_and_matches_a_cold_run() {
    let p = Project::new();
    let ft4 = p.path("ft4");
    scaled_copy(&ft4, 1.0005);
    p.write("p.toml", pipeline(&ingredients(), GREEDY));
    run_and_export(&p, "four");
    assert_eq!(log_counts(&p), (7, 0));

    let mut five = ingredients();
    five.push(ft4.clone());
    p.write("p.toml", pipeline(&five, GREEDY));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let warm = run_and_export(&p, "five-warm");
    let (evaluated, cached) = log_counts(&p);
    // The run's summary counts the evaluations as the soup's units of work.
    assert_eq!(r.stage("soup")["shards_computed"], evaluated as u64, "{}", r.summary());
    assert_eq!(r.stage("soup")["shards_total"], (evaluated + cached) as u64);
    assert_eq!(r.stage("soup")["work_unit"], "candidate score(s)");
    let soup: Value = serde_json::from_slice(&std::fs::read(warm.join("soup.json")).unwrap()).unwrap();
    let tries = soup["greedy_trace"].as_array().unwrap().len();
    assert_eq!(evaluated + cached, 5 + tries - 1);
    // The four singles are cached; so is every candidate made only of the first four that the
    // first run tried. What is new involves ft4.
    assert!(cached >= 4, "{cached} cached");
    assert!(evaluated >= 1 && evaluated < 5 + tries - 1, "{evaluated} evaluated");

    // A cold run (a fresh store) gives the same soup.
    let cold = Project::new();
    cold.write("p.toml", pipeline(&five, GREEDY));
    let cold_dir = run_and_export(&cold, "five-cold");
    for f in ["model.safetensors", "soup.json"] {
        assert_eq!(std::fs::read(warm.join(f)).unwrap(), std::fs::read(cold_dir.join(f)).unwrap(), "{f}");
    }
}

fn failing(p: &Project) -> String {
    let out = p.ladle(&["run", "p.toml"]);
    assert!(!out.status.success(), "the run should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_ingredients_are_clear_errors() {
    let p = Project::new();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/points-tiny");
    // Another architecture.
    p.write("p.toml", pipeline(&[soup_fixtures().join("ft0"), tiny.join("tiny-llama")], "method = \"uniform\""));
    let err = failing(&p);
    assert!(err.contains("not the same architecture") && err.contains("tensor `"), "{err}");

    // A shard missing from a sharded checkpoint.
    let broken = p.path("ft1-broken");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(soup_fixtures().join("ft1")).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_name().to_string_lossy().starts_with("model-00003") {
            std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
        }
    }
    p.write("p.toml", pipeline(&[soup_fixtures().join("ft0"), broken], "method = \"uniform\""));
    let err = failing(&p);
    assert!(err.contains("model-00003-of-00012.safetensors") && err.contains("missing"), "{err}");

    // A NaN in one tensor.
    let nan = p.path("ft-nan");
    scaled_copy(&nan, f32::NAN);
    p.write("p.toml", pipeline(&[soup_fixtures().join("ft0"), nan], "method = \"uniform\""));
    let err = failing(&p);
    assert!(err.contains("NaN") && err.contains("tensor `"), "{err}");

    // top larger than the list; an empty list; a method without its metric.
    p.write(
        "p.toml",
        pipeline(&ingredients(), "method = \"maximum\"\ntop = 9\neval = \"heldout\"\ntext = \"{caption}\""),
    );
    let err = failing(&p);
    assert!(err.contains("top = 9, but there are only 4 models"), "{err}");
    p.write("p.toml", pipeline(&[], "method = \"uniform\""));
    let err = failing(&p);
    assert!(err.contains("models"), "{err}");
    p.write("p.toml", pipeline(&ingredients(), "method = \"greedy\""));
    let err = failing(&p);
    assert!(err.contains("give `eval`"), "{err}");
    assert!(!p.path("out").exists());
}

/// `model.norm.weight[0]` of a checkpoint folder (single file or sharded).
fn first_norm_weight(dir: &Path) -> f32 {
    let index = dir.join("model.safetensors.index.json");
    let file = if index.exists() {
        let v: Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        dir.join(v["weight_map"]["model.norm.weight"].as_str().unwrap())
    } else {
        dir.join("model.safetensors")
    };
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    f32::from_le_bytes(st.tensor("model.norm.weight").unwrap().data()[..4].try_into().unwrap())
}

const NORM_METRIC: &str = r#"import json, struct, sys
f = open(sys.argv[1] + "/model.safetensors", "rb")
n = struct.unpack("<Q", f.read(8))[0]
h = json.loads(f.read(n))
f.seek(8 + n + h["model.norm.weight"]["data_offsets"][0])
print("evaluating", sys.argv[1])
print(struct.unpack("<f", f.read(4))[0])
"#;

#[test]
fn an_external_metric_command_ranks_and_builds_the_greedy_soup() {
    let p = Project::new();
    p.write("metric.py", NORM_METRIC);
    let soup = "method = \"greedy\"\nmetric = { command = [\"python3\", \"metric.py\", \"{model}\"], higher_is_better = true }\nmetric_deps = [\"metric.py\"]";
    p.write("p.toml", pipeline(&ingredients(), soup));
    let dir = run_and_export(&p, "by-command");
    let got: Value = serde_json::from_slice(&std::fs::read(dir.join("soup.json")).unwrap()).unwrap();

    // The same search by hand: higher is better, ties keep the order of `models`.
    let values: Vec<f64> = ingredients().iter().map(|d| first_norm_weight(d) as f64).collect();
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let mut pool = vec![order[0]];
    let mut pool_score = values[order[0]];
    let mut want = vec![(order[0], pool_score, true)];
    for &next in &order[1..] {
        let members: Vec<usize> = pool.iter().copied().chain([next]).collect();
        let mean = members.iter().map(|&i| values[i]).sum::<f64>() / members.len() as f64;
        let score = mean as f32 as f64; // the soup stores f32; the script reads it back
        let kept = score >= pool_score;
        want.push((next, score, kept));
        if kept {
            pool.push(next);
            pool_score = score;
        }
    }
    let trace = got["greedy_trace"].as_array().unwrap();
    assert_eq!(trace.len(), want.len());
    for (t, (i, score, kept)) in trace.iter().zip(&want) {
        assert_eq!(t["ingredient"], *i);
        assert_eq!(t["kept"], *kept);
        assert!((t["score"].as_f64().unwrap() - score).abs() <= 1e-7 * score.abs().max(1.0), "{t} vs {score}");
    }

    // A command that fails, or prints no number: errors that show its output.
    p.write("metric.py", "import sys\nprint('no GPU here', file=sys.stderr)\nsys.exit(3)\n");
    let err = failing(&p);
    assert!(err.contains("failed") && err.contains("no GPU here"), "{err}");
    p.write("metric.py", "print('accuracy: high')\n");
    let err = failing(&p);
    assert!(err.contains("must print one number"), "{err}");
}

#[test]
fn the_bundled_points_soup_pipeline_runs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("pipelines/points-soup.toml")).unwrap();
    let p = Project::new();
    p.write("p.toml", text.replace("../tests/fixtures", &repo.join("tests/fixtures").display().to_string()));
    let dir = run_and_export(&p, "soup");
    assert_within_one_ulp(&dir.join("model.safetensors"), &soup_fixtures().join("expected_greedy.safetensors"));
}

#[test]
fn an_image_conditioned_metric_scores_vlm_candidates_like_the_perplexity_stage() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/points-tiny");
    let p = Project::new();
    // A second VLM: the tiny LLaVA with every weight scaled by 1.001.
    let other = p.path("llava-b");
    scaled_model(&tiny.join("tiny-llava"), &other, 1.001);

    let all: Value = serde_json::from_str(&std::fs::read_to_string(tiny.join("expected.json")).unwrap()).unwrap();
    let prompt = all["prompt"].as_str().unwrap();
    let text = format!(
        "[pipeline]\nname = \"vlm-soup\"\n\n[stages.a]\nkind = \"model\"\npath = \"{}\"\n\n[stages.b]\nkind = \"model\"\npath = \"{}\"\n\n\
         [stages.captions]\nkind = \"read\"\npath = \"{}\"\n\n[stages.soup]\nkind = \"soup\"\nmodels = [\"a\", \"b\"]\nmethod = \"greedy\"\n\
         eval = \"captions\"\ntext = \"{{caption}}\"\nprompt = \"{prompt}\"\nimage = \"{{image}}\"\n",
        tiny.join("tiny-llava").display(),
        other.display(),
        tiny.join("captions.jsonl").display()
    );
    p.write("p.toml", text);
    let dir = run_and_export(&p, "vlm-soup");
    let soup: Value = serde_json::from_slice(&std::fs::read(dir.join("soup.json")).unwrap()).unwrap();
    // The tiny LLaVA's own score is the corpus perplexity of transformers' per-record values.
    let (mut nll, mut n) = (0.0, 0.0);
    for e in all["llava_image_conditioned"].as_array().unwrap() {
        let k = e["n_scored"].as_f64().unwrap();
        nll += e["mean_nll"].as_f64().unwrap() * k;
        n += k;
    }
    let want = (nll / n).exp();
    let got = soup["ingredients"][0]["metric"].as_f64().unwrap();
    assert!((got - want).abs() / want < 1e-3, "{got} vs transformers' {want}");
    assert_eq!(soup["greedy_trace"].as_array().unwrap().len(), 2);
    // The soup is a VLM that `perplexity` runs with images.
    assert!(dir.join("preprocessor_config.json").exists());
}

#[test]
fn scores_in_bf16_are_cached_apart_from_f32_and_stay_within_2e2() {
    let exp = expected();
    let p = Project::new();
    p.write("p.toml", pipeline(&ingredients(), GREEDY));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    p.write("p.toml", pipeline(&ingredients(), &format!("{GREEDY}\ndtype = \"bf16\"")));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    // None of the f32 scores is reused: every candidate is scored again, in bf16.
    assert_eq!(r.stage("soup")["shards_computed"], r.stage("soup")["shards_total"], "{}", r.summary());
    let dir = run_and_export(&p, "bf16");
    let soup: Value = serde_json::from_slice(&std::fs::read(dir.join("soup.json")).unwrap()).unwrap();
    for (i, e) in exp["single_heldout_ppl"].as_array().unwrap().iter().enumerate() {
        let (g, e) = (soup["ingredients"][i]["metric"].as_f64().unwrap(), e.as_f64().unwrap());
        assert!((g - e).abs() / e < 2e-2, "ingredient {i} in bf16: {g} vs {e}");
    }
}

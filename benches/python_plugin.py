"""A filter written in Python, sandboxed by ladle, against the same rules run as a native CPython
function (the way datatrove and data-juicer run a filter) and against a Rust plugin (issue #19).

Makes `--records` (default 1,000,000) caption records, then, on the same JSONL, side by side:
  - native: one CPython process reads the JSONL, `json.loads` each line, applies caption-rules'
    rules (the same code as plugins/examples/python/caption-rules/app.py, imported without the
    sandbox) and writes the kept lines: the throughput of running the filter unsandboxed;
  - python plugin: `ladle run` of read → plugin (caption-rules.wasm) → write, with a fresh store
    (the 18 MB component compiled first), then again on new records with the store of the first
    run (its compiled form loaded from the store), timing the stage's preparation from its log;
  - rust plugin: the same pipeline with the Rust `min-words` example (a different rule; the
    figure says what a compiled guest costs).
Prints records/s of each, the sandboxed Python filter's ratio to native CPython (issue goal:
>= 0.5), and the preparation time of the Python component without and with the kept compiled
form (goal: under 0.3 s with it).

    python3 benches/python_plugin.py [--records 1000000] [--ladle target/release/ladle]

Needs componentize-py (`pip install componentize-py==0.25.1`) to build the plugin, and the Rust
examples built (`cargo build --release --target wasm32-wasip2 --manifest-path plugins/examples/Cargo.toml`).
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "plugins/examples/python/caption-rules")
WASM = os.path.join(EXAMPLE, "target/caption_rules.wasm")
RUST = os.path.join(REPO, "plugins/examples/target/wasm32-wasip2/release/min_words.wasm")
CONFIG = {"min_words": 4, "min_alpha": 0.6, "banned": ["click here", "stock photo"]}

WORDS = "a dog cat red blue on the mat grass sky boat under near tree woman reading book sofa window".split()
NOISE = ["click here", "SN-4471-AX", "v2.3.1", "1234", "stock photo", "https://example.com/x.jpg"]


def make_records(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
            if rng.random() < 0.2:
                words.insert(rng.randint(0, len(words)), rng.choice(NOISE))
            f.write(json.dumps({"id": i, "caption": " ".join(words), "url": f"https://img.example/{i}.jpg"}) + "\n")


def native_rules():
    """caption-rules' `keep`, imported from app.py with a stand-in for the SDK (no sandbox)."""
    sdk = types.ModuleType("ladle_plugin")
    sdk.configure = sdk.filter = lambda fn: fn
    sdk.Filter = None
    sys.modules["ladle_plugin"] = sdk
    sys.path.insert(0, EXAMPLE)
    import app  # noqa: E402

    app.check(CONFIG)
    return app.keep


def native(src, dst):
    keep = native_rules()
    started = time.perf_counter()
    kept = 0
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            if keep(json.loads(line), CONFIG):
                out.write(line)
                kept += 1
    return time.perf_counter() - started, kept


def toml_table(config):
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in config.items()) + " }"


def pipeline(path, data, wasm, config):
    with open(path, "w") as f:
        f.write(
            f'[pipeline]\nname = "bench"\n\n[stages.d]\nkind = "read"\npath = "{data}"\n\n'
            f'[stages.f]\nkind = "plugin"\ndata = "d"\nwasm = "{wasm}"\nconfig = {toml_table(config)}\n'
            f'limits = {{ memory_mb = 128 }}\n\n[stages.w]\nkind = "write"\ndata = "f"\npath = "out.jsonl"\n'
        )


def ladle_run(ladle, work, store):
    started = time.perf_counter()
    run = subprocess.run([ladle, "run", "p.toml", "--store", store, "--json"], cwd=work, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"ladle failed:\n{run.stderr[-3000:]}")
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    stage = next(s for s in summary["stages"] if s["stage"] == "f")
    show = subprocess.run([ladle, "show", "p.toml", "f", "--store", store], cwd=work, capture_output=True, text=True)
    prepared = re.search(r"component .*: (.*)", show.stdout)
    return elapsed, stage["records"], prepared.group(1) if prepared else "?"


def seconds_in(text):
    m = re.search(r"in ([0-9.]+) s", text)
    return float(m.group(1)) if m else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--ladle", default=os.path.join(REPO, "target/release/ladle"))
    args = ap.parse_args()
    if not os.path.exists(WASM):
        sys.exit(f"{WASM} is missing: build it (see pipelines/python-filter.toml)")
    if not os.path.exists(RUST):
        sys.exit(f"{RUST} is missing: build the Rust examples (see plugins/README.md)")
    work = tempfile.mkdtemp(prefix="ladle-python-plugin-")
    try:
        a, b = os.path.join(work, "a.jsonl"), os.path.join(work, "b.jsonl")
        make_records(a, args.records, 1)
        make_records(b, args.records, 2)
        n = args.records

        native_s, native_kept = native(a, os.path.join(work, "native.jsonl"))

        store = os.path.join(work, "store")
        pipeline(os.path.join(work, "p.toml"), "a.jsonl", WASM, CONFIG)
        cold_s, cold_kept, cold_prep = ladle_run(args.ladle, work, store)
        pipeline(os.path.join(work, "p.toml"), "b.jsonl", WASM, CONFIG)
        warm_s, _, warm_prep = ladle_run(args.ladle, work, store)

        rust_store = os.path.join(work, "rust-store")
        pipeline(os.path.join(work, "p.toml"), "a.jsonl", RUST, {"min_words": 4})
        rust_s, rust_kept, _ = ladle_run(args.ladle, work, rust_store)

        if cold_kept != native_kept:
            sys.exit(f"the sandboxed filter kept {cold_kept} records, the native one {native_kept}")
        print(f"{n} records, {os.cpu_count()} cores; kept {native_kept} by caption-rules")
        print(f"native CPython (json.loads + rules, 1 process):  {native_s:7.2f} s  {n / native_s:10.0f} records/s")
        print(f"ladle, Python plugin, compiling it ({cold_prep}): {cold_s:7.2f} s  {n / cold_s:10.0f} records/s")
        print(f"ladle, Python plugin, kept compiled form ({warm_prep}): {warm_s:7.2f} s  {n / warm_s:10.0f} records/s")
        print(f"ladle, Rust plugin (min-words):                  {rust_s:7.2f} s  {n / rust_s:10.0f} records/s")
        print(f"sandboxed Python / native CPython: {native_s / cold_s:.2f}x compiling, {native_s / warm_s:.2f}x with the kept form")
        print(f"preparing the Python component: {seconds_in(cold_prep):.2f} s compiling, {seconds_in(warm_prep):.3f} s loading")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

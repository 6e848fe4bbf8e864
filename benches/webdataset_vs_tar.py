"""WebDataset corpora through ladle, against `tar` and Python's `webdataset` reader (issue #14).

Makes a synthetic corpus as img2dataset writes one: `--tars` tars (default 200) of `--samples`
samples (default 1,000), each a ~20 KB JPEG-sized `.jpg` member (random bytes behind a JPEG
signature: nothing here decodes pixels), a `.txt` caption and a `.json` — about 4 GB. Then, on
the same files, side by side:
  - `tar`: every tar extracted to stdout into /dev/null (`tar -xOf`), the throughput floor of
    reading the corpus at all;
  - `webdataset`: Python's reader (`wds.WebDataset(urls)`), touching every member;
  - ladle: `read → sample (20%) → write (webdataset tars)`: the read hashes each tar (its digest
    is in the keys) and indexes its members without copying image bytes; the write copies the
    kept 20% into new tars. Then a no-op rerun.
Prints each wall time, ladle's read throughput against tar's and against webdataset's, ladle's
peak memory for a quarter of the tars and for all (it must not grow with their number), the
no-op rerun's time and the store's size against the corpus's.

    python3 benches/webdataset_vs_tar.py [--tars 200] [--samples 1000] [--ladle target/release/ladle]

Needs `pip install webdataset` (skipped with a note without it).
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time


def make_corpus(root, tars, samples, image_bytes):
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    rng = random.Random(0)
    words = "a dog cat red blue on the under near two small bright sky grass park beach".split()
    total = 0
    for t in range(tars):
        path = os.path.join(root, "shards", f"{t:05}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in range(samples):
                key = f"{t:05}{s:04}"

                def add(name, data):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

                size = image_bytes + rng.randint(-image_bytes // 4, image_bytes // 4)
                add(f"{key}.jpg", b"\xff\xd8\xff\xe0" + rng.randbytes(size - 4))
                add(f"{key}.txt", " ".join(rng.choice(words) for _ in range(12)).encode())
                add(f"{key}.json", json.dumps({"key": key, "score": rng.random()}).encode())
        total += os.path.getsize(path)
    return total


def timed(cmd, **kw):
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - t, out


def ladle_run(ladle, root, pipeline, store):
    t, out = timed([ladle, "run", pipeline, "--json", "--store", store], cwd=root)
    summary = [json.loads(l) for l in out.stdout.decode().splitlines() if '"summary"' in l][-1]
    return t, summary


PIPELINE = """[pipeline]
name = "wds-bench"

[stages.corpus]
kind = "read"
path = "shards/{{00000..{last:05}}}.tar"

[stages.kept]
kind = "sample"
data = "corpus"
fraction = 0.2

[stages.out]
kind = "write"
data = "kept"
path = "out-{tag}/{{shard:05}}.tar"
samples_per_tar = 1000
"""


def du(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tars", type=int, default=200)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--image-bytes", type=int, default=20_000)
    ap.add_argument("--ladle", default="target/release/ladle")
    ap.add_argument("--dir", default=None, help="where to make the corpus (default: a temporary folder)")
    args = ap.parse_args()
    ladle = os.path.abspath(args.ladle)
    root = args.dir or tempfile.mkdtemp(prefix="wds-bench-")
    t = time.perf_counter()
    corpus = make_corpus(root, args.tars, args.samples, args.image_bytes)
    print(json.dumps({"corpus_bytes": corpus, "tars": args.tars, "samples": args.tars * args.samples,
                      "made_in_s": round(time.perf_counter() - t, 1)}), flush=True)
    tars = sorted(os.path.join(root, "shards", f) for f in os.listdir(os.path.join(root, "shards")))

    # Page cache warm for everyone: read the corpus once.
    for f in tars:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    tar_s, _ = timed(["sh", "-c", 'for f in "$@"; do tar -xOf "$f"; done > /dev/null', "sh", *tars])

    try:
        import webdataset as wds

        t = time.perf_counter()
        n = 0
        for sample in wds.WebDataset(tars, shardshuffle=False):
            n += len(sample["jpg"]) > 0
        wds_s = time.perf_counter() - t
    except ImportError:
        wds_s = None

    results = {}
    for tag, count in [("quarter", max(1, len(tars) // 4)), ("all", len(tars))]:
        with open(os.path.join(root, f"{tag}.toml"), "w") as f:
            f.write(PIPELINE.format(last=count - 1, tag=tag))
        store = os.path.join(root, f"store-{tag}")
        cold_s, summary = ladle_run(ladle, root, f"{tag}.toml", store)
        read = next(s for s in summary["stages"] if s["stage"] == "corpus")
        noop_s, again = ladle_run(ladle, root, f"{tag}.toml", store)
        assert all(s["status"] == "cached" for s in again["stages"]), again
        results[tag] = {"tars": count, "cold_s": cold_s, "read_s": read["seconds"], "peak_rss_bytes": summary.get("peak_rss_bytes"),
                        "noop_rerun_s": noop_s, "store_bytes": du(store),
                        "corpus_bytes": sum(os.path.getsize(f) for f in tars[:count])}
    full = results["all"]
    print(json.dumps({
        "tar_xOf_s": round(tar_s, 2),
        "webdataset_py_s": None if wds_s is None else round(wds_s, 2),
        "ladle_read_s": round(full["read_s"], 2),
        "ladle_cold_run_s": round(full["cold_s"], 2),
        "ladle_read_throughput_over_tar": round(tar_s / full["read_s"], 2),
        "ladle_read_over_webdataset_py": None if wds_s is None else round(wds_s / full["read_s"], 2),
        "peak_rss_mib": {k: round((v["peak_rss_bytes"] or 0) / 2**20, 1) for k, v in results.items()},
        "noop_rerun_s": round(full["noop_rerun_s"], 3),
        "store_over_corpus": round(full["store_bytes"] / full["corpus_bytes"], 4),
    }), flush=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`ladle report` on a million records (issue #15): time, peak memory and page size.

Makes 1,000,000 caption records, runs `read → exec (adds a perplexity-like `ppl`, log-normal, from
the id) → select (lowest 20%)`, then times `ladle report` on that run against `ladle export` of
the scored stage to JSONL (the same shards read once, the baseline for "reading the column"),
alternating, `--repeat` times; medians. Prints the report's wall time and peak RSS (GNU time's
%M), the page's size, and the ratio to the export.

    python3 benches/report_1m.py [--records 1000000] [--repeat 3] [--ladle target/release/ladle]
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time

WORDS = "a dog cat red blue on the under near two small bright sky grass park beach serial part no rev".split()

SCORE = (
    "import json,sys,math,random\n"
    "for l in sys.stdin:\n"
    " r=json.loads(l); g=random.Random(r['id']).gauss(1.5,0.8); r['ppl']=round(math.exp(g),4); print(json.dumps(r))"
)


def timed(cmd, cwd):
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, cwd=cwd, capture_output=True, check=True)
    wall = time.perf_counter() - t
    peak_kib = int(out.stderr.decode().strip().splitlines()[-1])
    return wall, peak_kib * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ladle", default="target/release/ladle")
    args = ap.parse_args()
    ladle = os.path.abspath(args.ladle)
    root = tempfile.mkdtemp(prefix="report-bench-")
    rng = random.Random(0)
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for i in range(args.records):
            f.write(json.dumps({"id": i, "caption": " ".join(rng.choice(WORDS) for _ in range(10))}) + "\n")
    with open(os.path.join(root, "p.toml"), "w") as f:
        f.write(
            '[pipeline]\nname = "report-bench"\n\n[stages.captions]\nkind = "read"\npath = "captions.jsonl"\n\n'
            '[stages.ppl]\nkind = "exec"\ndata = "captions"\nper_shard = true\n'
            f"command = {json.dumps(['python3', '-c', SCORE])}\n\n"
            '[stages.keep]\nkind = "select"\ndata = "ppl"\nby = "ppl"\nlowest = 0.2\n'
        )
    t = time.perf_counter()
    subprocess.run([ladle, "run", "p.toml"], cwd=root, check=True, capture_output=True)
    print(json.dumps({"records": args.records, "pipeline_run_s": round(time.perf_counter() - t, 1)}), flush=True)
    report, export = [], []
    for _ in range(args.repeat):
        report.append(timed([ladle, "report", "p.toml", "-o", "report.html"], root))
        export.append(timed([ladle, "export", "p.toml", "ppl", "-o", "ppl.jsonl"], root))
    r_s = statistics.median(w for w, _ in report)
    e_s = statistics.median(w for w, _ in export)
    print(json.dumps({
        "report_s": round(r_s, 3),
        "report_peak_rss_mib": round(max(m for _, m in report) / 2**20, 1),
        "report_html_kib": round(os.path.getsize(os.path.join(root, "report.html")) / 1024, 1),
        "export_jsonl_s": round(e_s, 3),
        "report_over_export": round(r_s / e_s, 2),
    }), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

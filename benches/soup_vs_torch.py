"""Model-soup averaging: ladle's streaming averager against the plain read of the same files and
against the load-everything-then-average approach in PyTorch (what WePOINTS' model_soup.py does),
side by side (issue #6).

Writes N synthetic bf16 checkpoints of SIZE GB each (random weights, realistic 4096-wide shapes),
then, each on warm page cache after one untimed pass over the files:
  - read limit: sequential reads of every input file in 16 MB chunks (the I/O bound);
  - ladle: `cargo bench --bench soup` (the `soup` stage's averager: uniform, f64 accumulation,
    round-to-nearest-even to bf16, one output shard per 5 GB);
  - PyTorch: safetensors.torch.load_file of every ingredient, then per tensor
    stack → float64 mean → bf16, then save_file (in a subprocess, for its peak RSS).
Prints GB/s of input for each, ladle's fraction of the read limit, the speed-up over PyTorch,
peak memory of both, and checks that the two soups are identical.

Needs torch and safetensors:
    python3 benches/soup_vs_torch.py [--ingredients 4] [--size-gb 2] [--work DIR] [--out DIR] [--repeat 3]
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoints(work, n, size_gb):
    import torch
    from safetensors.torch import save_file
    per_tensor = 4096 * 4096 * 2  # bytes of one bf16 [4096, 4096]
    count = max(1, int(size_gb * 1e9 // per_tensor))
    dirs = []
    for i in range(n):
        d = os.path.join(work, f"ing{i}")
        dirs.append(d)
        if os.path.exists(os.path.join(d, "model.safetensors")):
            continue
        os.makedirs(d, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {f"model.layers.{k}.weight": torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
                   for k in range(count)}
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "synthetic"}, f)
    return dirs


def files_of(dirs):
    return [os.path.join(d, "model.safetensors") for d in dirs]


def read_all(paths):
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                b = f.read(16 << 20)
                if not b:
                    break
                total += len(b)
    return total, time.perf_counter() - t


TORCH_SOUP = r"""
import sys, time, json, resource, torch
from safetensors.torch import load_file, save_file
out, paths = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
states = [load_file(p) for p in paths]
soup = {k: torch.stack([s[k] for s in states]).double().mean(0).to(states[0][k].dtype) for k in states[0]}
save_file(soup, out, metadata={"format": "pt"})
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ingredients", type=int, default=4)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ladle-soup-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", help="where both write their soup (default: --work; /dev/shm takes the disk out)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    dirs = make_checkpoints(args.work, args.ingredients, args.size_gb)
    paths = files_of(dirs)
    read_all(paths)  # warm the page cache: every contender then reads from memory alike
    out_dir = args.out or args.work
    os.makedirs(out_dir, exist_ok=True)
    ladle_out = os.path.join(out_dir, "soup-ladle")
    subprocess.run(["cargo", "bench", "--quiet", "--bench", "soup", "--no-run"], cwd=ROOT, check=True,
                   capture_output=True)
    # The read limit and ladle alternate, --repeat times each; medians are reported (this kind of
    # machine varies by ±20% from run to run).
    reads, runs = [], []
    for _ in range(args.repeat):
        total, read_s = read_all(paths)
        reads.append(read_s)
        shutil.rmtree(ladle_out, ignore_errors=True)
        out = subprocess.run(["cargo", "bench", "--quiet", "--bench", "soup", "--", ladle_out, *dirs],
                             cwd=ROOT, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    read_s = sorted(reads)[len(reads) // 2]
    ladle = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]

    torch_out = os.path.join(out_dir, "soup-torch.safetensors")
    out = subprocess.run([sys.executable, "-c", TORCH_SOUP, torch_out, *paths], check=True, capture_output=True,
                         text=True)
    torch_r = json.loads(out.stdout.strip().splitlines()[-1])

    from safetensors import safe_open
    same = True
    with safe_open(os.path.join(ladle_out, "model.safetensors"), "pt") as a, safe_open(torch_out, "pt") as b:
        for k in b.keys():
            if not bool((a.get_tensor(k).view(dtype=__import__("torch").int16) ==
                         b.get_tensor(k).view(dtype=__import__("torch").int16)).all()):
                same = False
                break

    gb = total / 1e9
    print(json.dumps({"input_gb": gb, "read_limit_gb_per_s": gb / read_s}))
    print(json.dumps(ladle))
    print(json.dumps({"impl": "pytorch load-all", "input_gb_per_s": gb / torch_r["seconds"], **torch_r}))
    print(f"ladle {ladle['input_gb_per_s']:.2f} GB/s = {ladle['input_gb_per_s'] / (gb / read_s):.0%} of the read limit "
          f"({gb / read_s:.2f} GB/s); {torch_r['seconds'] / ladle['seconds']:.2f}x faster than PyTorch "
          f"({gb / torch_r['seconds']:.2f} GB/s); peak RSS ladle {ladle['peak_rss_bytes'] / 2**20:.0f} MiB vs PyTorch "
          f"{torch_r['peak_rss_bytes'] / 2**20:.0f} MiB ({ladle['peak_rss_bytes'] / torch_r['peak_rss_bytes']:.1%}); "
          f"soups bit-identical: {same}; output written to {out_dir}")


if __name__ == "__main__":
    main()

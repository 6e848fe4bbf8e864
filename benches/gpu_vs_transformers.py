"""Perplexity scoring: a ladle binary against Hugging Face transformers on the same machine and
device, on the very same random-weight model and token ids (issue #7; works on the CPU too).

  1. `ladle bench score --save DIR` makes a model of a real shape with random weights (no
     download), scores random token sequences (lengths around --length) in batches of at most
     --batch-tokens tokens, and writes the model (config.json, model.safetensors) and the token
     ids (tokens.json) to DIR; it reports tokens/s and the fraction of the device's matmul
     roofline (2 x parameters FLOPs per token against a measured dense matmul).
  2. transformers loads DIR (AutoModelForCausalLM, sdpa attention, the same dtype and device)
     and scores the same sequences in the same batches (sorted by length, filled up to the
     budget, right-padded with an attention mask), log_softmax in f32 + gather of the targets,
     as a scoring script does.
Prints tokens/s for both, the ratio, and how far apart the two NLL sums are.

The machine needs torch and transformers, and the binary the libraries docs/cuda.md lists:
    python3 benches/gpu_vs_transformers.py --ladle ./ladle --shape qwen2-7b --device cuda --dtype bf16
    python3 benches/gpu_vs_transformers.py --ladle target/release/ladle --shape qwen2-0.5b --layers 4 --device cpu
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import transformers


def plan_batches(lengths, budget):
    """ladle's plan_batches: indices sorted by (length, index), a new batch when count x longest
    would pass the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        longest_with = max(longest, lengths[i])
        if current and (len(current) + 1) * longest_with > budget:
            batches.append(current)
            current, longest_with = [], lengths[i]
        current.append(i)
        longest = longest_with
    if current:
        batches.append(current)
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, batches, device):
    """One untimed warm-up batch, as ladle's benches do, then every batch timed: (seconds, the
    sum of what `run` returns)."""
    with torch.inference_mode():
        run(batches[0])
        sync(device)
        t = time.perf_counter()
        total = sum(run(b) for b in batches)
        sync(device)
    return time.perf_counter() - t, total


def run_ladle(cmd):
    """Runs a `ladle bench` command; its last line of output, as JSON."""
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"ladle bench failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def hf_score(model, seqs, batches, device):
    def run(batch):
        width = max(len(seqs[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return float(-(logp * mask[:, 1:]).sum())

    return timed(run, batches, device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ladle", required=True, help="the ladle binary (a `cuda` build for --device cuda)")
    ap.add_argument("--shape", default="qwen2-7b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--sequences", type=int, default=1024)
    ap.add_argument("--length", type=int, default=60)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--work", default="/tmp/ladle-gpu-bench")
    a = ap.parse_args()

    cmd = [a.ladle, "bench", "score", "--shape", a.shape, "--device", a.device, "--dtype", a.dtype,
           "--sequences", str(a.sequences), "--length", str(a.length), "--batch-tokens", str(a.batch_tokens),
           "--save", a.work]
    if a.layers:
        cmd += ["--layers", str(a.layers)]
    ladle = run_ladle(cmd)
    r = ladle["report"]

    seqs = json.load(open(os.path.join(a.work, "tokens.json")))
    batches = plan_batches([len(s) for s in seqs], a.batch_tokens)
    device = torch.device(a.device if a.device != "cuda" else "cuda:0")
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.work, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    secs, nll = hf_score(model, seqs, batches, device)
    scored = sum(len(s) - 1 for s in seqs)
    hf_tps = scored / secs
    print(json.dumps({"impl": "ladle", **ladle}))
    print(json.dumps({"impl": "transformers", "version": transformers.__version__, "torch": torch.__version__,
                      "seconds": secs, "tokens_per_s": hf_tps, "nll_sum": nll, "batches": len(batches)}))
    print(f"{a.shape} ({ladle['layers']} layers) {a.dtype} on {a.device}: {len(seqs)} sequences, {scored} scored "
          f"tokens, {len(batches)} batches of <= {a.batch_tokens} tokens")
    print(f"ladle {r['tokens_per_s']:.0f} tok/s vs transformers {hf_tps:.0f} tok/s: {r['tokens_per_s'] / hf_tps:.2f}x; "
          f"ladle at {ladle['roofline_fraction']:.1%} of the matmul roofline "
          f"({ladle['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s measured); "
          f"NLL sums differ by {abs(r['nll_sum'] - nll) / nll:.1e} (relative)")


if __name__ == "__main__":
    main()

"""Perplexity scoring on CPU: ladle against Hugging Face transformers, side by side (issue #4).

Makes a model of a realistic shape with random weights (no download; default: Qwen2-0.5B's config)
with the tokenizer of the tiny fixture model, tokenizes the fixture captions once, and scores the
same token ids with the same batch sizes in f32 with both:
  - transformers: AutoModelForCausalLM (sdpa attention), right padding with an attention mask,
    log_softmax + gather of the targets (what a scoring script does);
  - ladle: `cargo bench --bench llm` (its own forward pass, as the perplexity stage runs it).
Prints tokens/s for each, the ratio, peak memory, and checks the two agree on the NLL sum.

The two alternate batch by batch, `--repeat` times (this machine's speed drifts within minutes);
the ratio is the median of each repeat's ratio.

Needs torch and transformers:
    python3 benches/llm_vs_transformers.py [--layers N] [--texts N] [--batches 1,4,16] [--repeat 3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests/fixtures/points-tiny/tiny-qwen2")


def make_model(out, layers):
    if os.path.exists(os.path.join(out, "config.json")):
        return
    cfg = transformers.Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        with open(os.path.join(TINY, f)) as src, open(os.path.join(out, f), "w") as dst:
            dst.write(src.read())


def texts(n):
    caps = [json.loads(l)["caption"] for l in open(os.path.join(ROOT, "tests/fixtures/points-tiny/captions.jsonl"))]
    return [caps[i % len(caps)] + " " + caps[(i * 7 + 3) % len(caps)] for i in range(n)]


def hf_score(model, seqs, batch):
    nll = 0.0
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            nll += float(-(logp * mask[:, 1:]).sum())
    return time.perf_counter() - t, nll


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--dir", default="/tmp/ladle-bench-qwen2-0.5b")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    out = f"{a.dir}-{a.layers}l"
    make_model(out, a.layers)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    seqs = [tok(t)["input_ids"] for t in texts(a.texts)]
    scored = sum(len(s) - 1 for s in seqs)
    path = os.path.join(out, "tokens.json")
    json.dump(seqs, open(path, "w"))
    print(f"model: Qwen2-0.5B shape, {a.layers} layers, random weights, f32; {len(seqs)} texts, "
          f"{scored} scored tokens (mean {scored / len(seqs):.0f}/text); torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, transformers {transformers.__version__}")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    subprocess.run(["cargo", "bench", "--quiet", "--bench", "llm", "--no-run"], cwd=ROOT, check=True, capture_output=True)
    # This machine's speed drifts within minutes, so the two run alternately, batch by batch, and
    # each repeat's ratio compares neighbours; medians over the repeats.
    hf, ours = {}, {}
    for _ in range(a.repeat):
        for b in map(int, a.batches.split(",")):
            hf.setdefault(b, []).append(hf_score(model, seqs, b))
            run = subprocess.run(["cargo", "bench", "--quiet", "--bench", "llm", "--", out, path, str(b)],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            ours.setdefault(b, []).extend(json.loads(l) for l in run.stdout.splitlines() if l.startswith("{"))
    hf_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"medians of {a.repeat} alternating repeats")
    print(f"{'batch':>5}  {'transformers tok/s':>18}  {'ladle tok/s':>11}  {'ladle/hf':>8}  {'NLL rel. diff':>13}")
    for b in hf:
        hf_tps = [scored / secs for secs, _ in hf[b]]
        tps = [r["tokens_per_s"] for r in ours[b]]
        ratio = med([t / h for t, h in zip(tps, hf_tps)])
        diff = max(abs(r["nll_sum"] - nll) / nll for r, (_, nll) in zip(ours[b], hf[b]))
        print(f"{b:>5}  {med(hf_tps):>18.0f}  {med(tps):>11.0f}  {ratio:>8.2f}  {diff:>13.1e}")
    peak = max(r["peak_rss_bytes"] for rs in ours.values() for r in rs)
    print(f"peak RSS: transformers {hf_rss / 2**30:.2f} GiB, ladle {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())

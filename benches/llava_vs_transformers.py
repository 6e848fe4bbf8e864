"""Image-conditioned scoring: a ladle binary against Hugging Face transformers' LLaVA on the same
machine and device, on the very same random-weight model, images and token ids (issue #16; works
on the CPU too, on cut-down shapes).

  1. `ladle bench llava --save --work DIR` makes a LLaVA of a real shape (LLaVA-1.5-7B: CLIP
     ViT-L/14-336, a two-layer projector, a 7B LLaMA) with random weights, makes records (noise
     images of random sizes, captions of random tokens) with the bundled tiny-llava tokenizer,
     scores them as the `perplexity` stage does with `image` (batches of similar length under
     --batch-tokens positions, image slots counted), and writes the model, the pixel values
     (inputs.safetensors) and the token ids with the image slots in place (records.json).
  2. transformers loads DIR (LlavaForConditionalGeneration, sdpa attention, the same dtype and
     device) and scores the same records in the same batches (right-padded with an attention
     mask), log_softmax in f32 + gather of the caption's targets, as a scoring script does.
Prints records/s for both, the ratio, and how far apart the two NLL sums are.

    python3 benches/llava_vs_transformers.py --ladle ./ladle --device cuda --dtype bf16
    python3 benches/llava_vs_transformers.py --ladle target/release/ladle --device cpu --dtype f32 \\
        --layers 2 --vision-layers 2 --records 8
"""

import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_vs_transformers import plan_batches, run_ladle, timed  # noqa: E402


def hf_score(model, records, pixels, batches, device, dtype):
    def run(batch):
        width = max(len(records[i]["ids"]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width - 1), dtype=torch.float32)
        for r, i in enumerate(batch):
            rec = records[i]
            n = len(rec["ids"])
            ids[r, :n] = torch.tensor(rec["ids"])
            mask[r, :n] = 1
            # Target p (predicted at p - 1) is scored from score_from on.
            scored[r, rec["score_from"] - 1:n - 1] = 1
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        px = pixels[batch].to(device=device, dtype=dtype)
        logits = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return float(-(logp * scored).sum())

    return timed(run, batches, device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ladle", required=True, help="the ladle binary (a `cuda` build for --device cuda)")
    ap.add_argument("--shape", default="llava-1.5-7b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vision-layers", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--length", type=int, default=60)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--work", default="/tmp/ladle-llava-bench")
    a = ap.parse_args()

    cmd = [a.ladle, "bench", "llava", "--shape", a.shape, "--device", a.device, "--dtype", a.dtype,
           "--records", str(a.records), "--length", str(a.length), "--batch-tokens", str(a.batch_tokens),
           "--work", a.work, "--save"]
    if a.layers:
        cmd += ["--layers", str(a.layers)]
    if a.vision_layers:
        cmd += ["--vision-layers", str(a.vision_layers)]
    ladle = run_ladle(cmd)
    r = ladle["report"]

    records = json.load(open(os.path.join(a.work, "records.json")))
    pixels = load_file(os.path.join(a.work, "inputs.safetensors"))["pixel_values"]
    batches = plan_batches([len(rec["ids"]) for rec in records], a.batch_tokens)
    device = torch.device(a.device if a.device != "cuda" else "cuda:0")
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        a.work, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    secs, nll = hf_score(model, records, pixels, batches, device, dtype)
    hf_rps = len(records) / secs
    print(json.dumps({"impl": "ladle", **ladle}))
    print(json.dumps({"impl": "transformers", "version": transformers.__version__, "torch": torch.__version__,
                      "seconds": secs, "records_per_s": hf_rps, "nll_sum": nll, "batches": len(batches)}))
    print(f"{a.shape} ({ladle['layers']} text, {ladle['vision_layers']} vision layers) {a.dtype} on {a.device}: "
          f"{len(records)} records, {r['positions']} positions, {len(batches)} batches of <= {a.batch_tokens}")
    print(f"ladle {r['records_per_s']:.2f} records/s vs transformers {hf_rps:.2f} records/s: "
          f"{r['records_per_s'] / hf_rps:.2f}x; NLL sums differ by {abs(r['nll_sum'] - nll) / nll:.1e} (relative)")


if __name__ == "__main__":
    main()

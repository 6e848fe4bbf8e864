"""POINTS' image-conditioned perplexity on CPU: ladle against Hugging Face transformers, side by side
(issue #12).

Makes a Qwen2-VL of Qwen2-VL-2B's shape with random weights (no download; fewer blocks and layers:
`--vision-blocks`, `--layers`, default 4 and 4), the tokenizer, chat template and special tokens of
the tiny fixture model, and Qwen2-VL-2B's image bounds (min_pixels 3136, max_pixels 12845056);
writes 16 photo-sized JPEGs (COCO's sizes, from the fixture pictures). Both sides score the same
records with POINTS' semantics (image + "please generate a caption for this image." in the user
turn, the caption and <|im_end|> scored), in f32, the same batches:
  - transformers: qwen_vl_utils.process_vision_info + the processor per record (as POINTS'
    script), the batch's images packed and its sequences right-padded, Qwen2VLForConditionalGeneration
    (sdpa) with logits kept only at the scored span (`logits_to_keep`), log_softmax there;
  - ladle: `cargo bench --bench qwen2vl` (the `perplexity` stage's path).
Both times run from image files to scores. They alternate batch size by batch size, `--repeat`
times (this machine's speed drifts within minutes); the ratio is the median of each repeat's ratio.
Prints records/s, the ratio, where the time went (preparation / vision tower / language model), the
largest difference in mean NLL, and peak memory.

Needs torch, transformers, torchvision, qwen-vl-utils, pillow:
    python3 benches/qwen2vl_vs_transformers.py [--batches 1,4] [--repeat 3] [--records 16]
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
from PIL import Image
from qwen_vl_utils import process_vision_info
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests/fixtures/points-tiny")
PROMPT = "please generate a caption for this image."
# COCO's common sizes (width, height).
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 360), (612, 612), (640, 480),
         (640, 424), (375, 500), (640, 512), (640, 480), (480, 480), (640, 426), (500, 333), (640, 480)]


def make_model(out, vision_blocks, layers):
    if os.path.exists(os.path.join(out, "config.json")):
        return
    tok = Tokenizer.from_file(os.path.join(TINY, "tiny-qwen2-vl/tokenizer.json"))
    tid = tok.token_to_id
    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))
    vision = dict(depth=vision_blocks, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                  hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                     image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                                     vision_start_token_id=tid("<|vision_start|>"),
                                     vision_end_token_id=tid("<|vision_end|>"))
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    src = os.path.join(TINY, "tiny-qwen2-vl")
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "generation_config.json"]:
        with open(os.path.join(src, f)) as a, open(os.path.join(out, f), "w") as b:
            b.write(a.read())
    pp = json.load(open(os.path.join(src, "preprocessor_config.json")))
    pp.update(min_pixels=3136, max_pixels=12845056)
    pp.pop("size", None)
    json.dump(pp, open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)


def make_records(out, n):
    caps = [json.loads(l) for l in open(os.path.join(TINY, "captions.jsonl"))]
    records = []
    for i in range(n):
        path = os.path.join(out, f"photo{i:02d}.jpg")
        if not os.path.exists(path):
            src = Image.open(os.path.join(TINY, caps[i % len(caps)]["image"])).convert("RGB")
            src.resize(SIZES[i % len(SIZES)], Image.BICUBIC).save(path, quality=90)
        records.append({"image": path, "caption": caps[i % len(caps)]["caption"]})
    return records


class VisionClock:
    """Wall time spent inside the vision tower, from forward hooks."""

    def __init__(self, module):
        self.total = 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "start", time.perf_counter()))
        module.register_forward_hook(lambda *_: setattr(self, "total", self.total + time.perf_counter() - self.start))


def hf_prepare(proc, tok, rec):
    msgs = [{"role": "user", "content": [{"type": "image", "image": rec["image"]}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(msgs)
    inputs = proc(text=[text], images=images, return_tensors="pt")
    answer = tok.encode(rec["caption"] + "<|im_end|>", add_special_tokens=False).ids
    return inputs, answer


def hf_score(model, proc, tok, clock, records, batch):
    t0 = time.perf_counter()
    vision0 = clock.total
    prepared = [hf_prepare(proc, tok, r) for r in records]
    prepare_s = time.perf_counter() - t0
    nll = []
    with torch.inference_mode():
        for i in range(0, len(prepared), batch):
            chunk = prepared[i:i + batch]
            rows = [c[0]["input_ids"][0].tolist() + c[1] for c in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            mm = torch.zeros_like(ids)
            for k, (r, c) in enumerate(zip(rows, chunk)):
                ids[k, :len(r)] = torch.tensor(r)
                mask[k, :len(r)] = 1
                n = c[0]["mm_token_type_ids"].shape[1]
                mm[k, :n] = c[0]["mm_token_type_ids"][0]
            starts = [c[0]["input_ids"].shape[1] for c in chunk]
            keep = torch.arange(min(starts) - 1, width - 1)
            out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                        pixel_values=torch.cat([c[0]["pixel_values"] for c in chunk]),
                        image_grid_thw=torch.cat([c[0]["image_grid_thw"] for c in chunk]), logits_to_keep=keep)
            for k, (r, s) in enumerate(zip(rows, starts)):
                logits = out.logits[k, s - 1 - (min(starts) - 1):len(r) - 1 - (min(starts) - 1)]
                logp = torch.log_softmax(logits.float(), -1)
                target = torch.tensor(r[s:])
                nll.append(float(-logp.gather(-1, target[:, None]).sum()) / len(target))
    seconds = time.perf_counter() - t0
    vision_s = clock.total - vision0
    return {"seconds": seconds, "records_per_s": len(records) / seconds, "prepare_s": prepare_s,
            "vision_s": vision_s, "language_s": seconds - prepare_s - vision_s, "mean_nll": nll}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vision-blocks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dir", default="/tmp/ladle-bench-qwen2vl-2b")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    out = f"{a.dir}-{a.vision_blocks}v{a.layers}l"
    make_model(out, a.vision_blocks, a.layers)
    os.makedirs(os.path.join(out, "photos"), exist_ok=True)
    records = make_records(os.path.join(out, "photos"), a.records)
    spec = os.path.join(out, "records.json")
    json.dump({"prompt": PROMPT, "records": records}, open(spec, "w"))
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="sdpa").eval()
    proc = transformers.AutoProcessor.from_pretrained(out)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    clock = VisionClock(model.model.visual)
    print(f"model: Qwen2-VL-2B shape, {a.vision_blocks} vision blocks, {a.layers} LM layers, random weights, f32; "
          f"{len(records)} photos {SIZES[0][0]}×{SIZES[0][1]}-ish; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, transformers {transformers.__version__}")
    subprocess.run(["cargo", "bench", "--quiet", "--bench", "qwen2vl", "--no-run"], cwd=ROOT, check=True,
                   capture_output=True)
    hf, ours = {}, {}
    for _ in range(a.repeat):
        for b in map(int, a.batches.split(",")):
            hf.setdefault(b, []).append(hf_score(model, proc, tok, clock, records, b))
            run = subprocess.run(["cargo", "bench", "--quiet", "--bench", "qwen2vl", "--", out, spec, str(b)],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            ours.setdefault(b, []).extend(json.loads(l) for l in run.stdout.splitlines() if l.startswith("{"))
    hf_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    med = lambda xs: sorted(xs)[len(xs) // 2]
    tokens = ours[next(iter(ours))][0]["image_tokens"]
    print(f"{tokens} image tokens in all; medians of {a.repeat} alternating repeats")
    print(f"{'batch':>5}  {'hf rec/s':>8}  {'ladle rec/s':>11}  {'ladle/hf':>8}  "
          f"{'hf prep/vision/lm s':>20}  {'ladle prep/vision/lm s':>23}  {'NLL rel. diff':>13}")
    for b in hf:
        ratio = med([o["records_per_s"] / h["records_per_s"] for o, h in zip(ours[b], hf[b])])
        diff = max(abs(x - y) / y for o, h in zip(ours[b], hf[b]) for x, y in zip(o["mean_nll"], h["mean_nll"]))
        split = lambda rs: "/".join(f"{med([r[k] for r in rs]):.2f}" for k in ("prepare_s", "vision_s", "language_s"))
        print(f"{b:>5}  {med([h['records_per_s'] for h in hf[b]]):>8.3f}  "
              f"{med([o['records_per_s'] for o in ours[b]]):>11.3f}  {ratio:>8.2f}  {split(hf[b]):>20}  "
              f"{split(ours[b]):>23}  {diff:>13.1e}")
    peak = max(r["peak_rss_bytes"] for rs in ours.values() for r in rs)
    print(f"peak RSS: transformers {hf_rss / 2**30:.2f} GiB (the whole Python process), ladle {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())

"""Image encoding on CPU: ladle's `encode` against Hugging Face transformers, side by side (issue #5).

Makes a CLIP ViT-L/14-336-shaped vision tower with random weights (no download) and a set of
photo-sized test images (JPEG and PNG, several sizes), then encodes the same images with the
same batch size in f32 with both:
  - transformers: PIL decode + CLIPImageProcessor, then CLIPVisionModel(output_hidden_states=True),
    hidden_states[-2] without the class token (what LLaVA-style feature extraction does);
  - ladle: `cargo bench --bench encode` (decode + preprocess + tower, the `encode` stage's path),
    and `ladle run` of an `encode` pipeline end to end (store writes included).
Prints images/s for each, the ratio, the preprocessing share of each, and checks that the two
agree on the embeddings.

Needs torch, transformers and pillow:
    python3 benches/encode_vs_transformers.py [--images N] [--batch B] [--layers L]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(out, layers):
    if os.path.exists(os.path.join(out, "config.json")):
        return
    cfg = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg)
    model.save_pretrained(out, safe_serialization=True)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out)


def make_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (500, 375), (800, 600), (480, 640), (1024, 768), (333, 500)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (i + 3)) % 256, (y * (i + 5)) % 256, ((x + y) * 2) % 256], axis=-1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        ext = "jpg" if i % 2 == 0 else "png"
        path = os.path.join(folder, f"img{i:03d}.{ext}")
        img.save(path, quality=90) if ext == "jpg" else img.save(path)
        paths.append(path)
    return paths


def hf_encode(model_dir, paths, batch):
    processor = transformers.CLIPImageProcessor.from_pretrained(model_dir)
    model = transformers.CLIPVisionModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    t = time.perf_counter()
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    preprocess_s = time.perf_counter() - t
    t = time.perf_counter()
    total, first = 0.0, None
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            out = model(pixel_values=pixels[i:i + batch], output_hidden_states=True)
            feats = out.hidden_states[-2][:, 1:]
            if first is None:
                first = feats.flatten()[:8].tolist()
            total += feats.double().sum().item()
    tower_s = time.perf_counter() - t
    return {"impl": "transformers", "images_per_s": len(paths) / (preprocess_s + tower_s),
            "preprocess_s": preprocess_s, "tower_s": tower_s,
            "preprocess_share": preprocess_s / (preprocess_s + tower_s), "embedding_sum": total, "first": first}


def ladle_bench(model_dir, images_json, batch):
    out = subprocess.run(
        ["cargo", "bench", "--quiet", "--bench", "encode", "--", model_dir, images_json, str(batch)],
        cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ladle_run(model_dir, paths, batch, work):
    with open(os.path.join(work, "images.jsonl"), "w") as f:
        for p in paths:
            f.write(json.dumps({"image": p}) + "\n")
    with open(os.path.join(work, "encode.toml"), "w") as f:
        f.write(f"""[pipeline]
name = "encode-bench"
[stages.images]
kind = "read"
path = "images.jsonl"
shard_records = {len(paths)}
[stages.encoder]
kind = "model"
path = "{model_dir}"
[stages.emb]
kind = "encode"
data = "images"
model = "encoder"
image = "{{image}}"
batch_images = {batch}
""")
    subprocess.run(["cargo", "build", "--quiet", "--release"], cwd=ROOT, check=True)
    ladle = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "ladle")
    store = tempfile.mkdtemp()
    t = time.perf_counter()
    subprocess.run([ladle, "run", os.path.join(work, "encode.toml"), "--store", store], check=True,
                   capture_output=True)
    secs = time.perf_counter() - t
    return {"impl": "ladle run (end to end, model load and store writes included)", "images_per_s": len(paths) / secs,
            "seconds": secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ladle-encode-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model_dir = os.path.join(args.work, f"clip-vit-l14-336-{args.layers}l")
    make_model(model_dir, args.layers)
    paths = make_images(os.path.join(args.work, "images"), args.images)
    images_json = os.path.join(args.work, "images.json")
    with open(images_json, "w") as f:
        json.dump(paths, f)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{args.images} images, batch {args.batch}, ViT-L/14-336 shape with {args.layers} layers, f32", file=sys.stderr)

    ladle = ladle_bench(model_dir, images_json, args.batch)
    hf = hf_encode(model_dir, paths, args.batch)
    end_to_end = ladle_run(model_dir, paths, args.batch, args.work)
    for r in (hf, ladle, end_to_end):
        print(json.dumps(r))
    rel = abs(ladle["embedding_sum"] - hf["embedding_sum"]) / max(abs(hf["embedding_sum"]), 1e-9)
    first = max(abs(a - b) for a, b in zip(ladle["first"], hf["first"]))
    print(f"ladle / transformers images/s: {ladle['images_per_s'] / hf['images_per_s']:.2f}x "
          f"(ladle {ladle['images_per_s']:.3f}, transformers {hf['images_per_s']:.3f}); "
          f"preprocessing share: ladle {ladle['preprocess_share']:.1%}, transformers {hf['preprocess_share']:.1%}; "
          f"end to end `ladle run`: {end_to_end['images_per_s']:.3f} images/s")
    print(f"agreement: embedding sums differ by {rel:.2e} (relative), first values by {first:.2e}")


if __name__ == "__main__":
    main()

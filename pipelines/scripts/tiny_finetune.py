"""A stand-in for fine-tuning, so pipelines/points-recipe.toml runs in seconds on any machine.

    python3 tiny_finetune.py BASE DATA CHECKPOINTS OUT

It does not train. Each record of DATA (JSONL) names, in `stand_in`, the bundled fine-tune of
tiny-qwen2 that training on its source stands in for (tests/fixtures/points-tiny/soup/ftN); the
output is the average of those checkpoints weighted by how many records name each, written as
a model folder in OUT with BASE's config and tokenizer. So a mixture of datasets gives the
mixture of their fine-tunes, deterministically, and more records of a source pull the result
closer to its fine-tune. A real pipeline runs its trainer here instead (see the recipe's notes).
Pure Python: float32 safetensors, one file or sharded with an index.
"""
import json
import os
import shutil
import struct
import sys
from array import array
from collections import Counter


def read_safetensors(folder):
    """{name: array('f')} of a model folder, sharded or not; float32 only."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors, shapes = {}, {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] != "F32":
                sys.exit(f"{folder}/{name}: tensor {key} is {info['dtype']}; this stand-in reads F32 only")
            start, end = info["data_offsets"]
            values = array("f")
            values.frombytes(data[start:end])
            if sys.byteorder != "little":
                values.byteswap()
            tensors[key], shapes[key] = values, info["shape"]
    return tensors, shapes


def write_safetensors(path, tensors, shapes):
    header, offset, blobs = {}, 0, []
    for key in sorted(tensors):
        blob = tensors[key].tobytes()
        header[key] = {"dtype": "F32", "shape": shapes[key], "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


def main():
    base, data, checkpoints, out = sys.argv[1:5]
    counts = Counter()
    with open(data) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if "stand_in" not in record:
                    sys.exit(f"{data}: record {number} has no `stand_in` field naming a bundled fine-tune")
                counts[record["stand_in"]] += 1
    if not counts:
        sys.exit(f"{data}: no records to train on")
    total = sum(counts.values())
    mixed, shapes = None, None
    for name in sorted(counts):
        tensors, these = read_safetensors(os.path.join(checkpoints, name))
        weight = counts[name] / total
        if mixed is None:
            mixed = {k: [weight * x for x in v] for k, v in tensors.items()}
            shapes = these
        else:
            for k, v in tensors.items():
                acc = mixed[k]
                for i, x in enumerate(v):
                    acc[i] += weight * x
        print(f"{name}: {counts[name]} record(s), weight {weight:.4f}")
    write_safetensors(os.path.join(out, "model.safetensors"), {k: array("f", v) for k, v in mixed.items()}, shapes)
    for name in os.listdir(base):
        if name.endswith(".json") and not name.startswith("model.safetensors"):
            shutil.copy(os.path.join(base, name), os.path.join(out, name))


main()

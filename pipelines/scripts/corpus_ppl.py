"""Corpus perplexity of a dataset scored by a `perplexity` stage, as a metrics file.

    python3 corpus_ppl.py SCORED.jsonl OUT [COLUMN]

exp(sum of NLL / sum of scored tokens) over the records (the column prefix defaults to `ppl`:
`ppl_nll` is a record's mean NLL and `ppl_tokens` its scored tokens), written to
OUT/metrics.json as {"ppl": ..., "nll": ..., "tokens": ...}: the soup's built-in metric, for a
`choose` stage to pick by.
"""
import json
import math
import os
import sys

scored, out = sys.argv[1], sys.argv[2]
column = sys.argv[3] if len(sys.argv) > 3 else "ppl"
nll, tokens = 0.0, 0
with open(scored) as f:
    for line in f:
        if line.strip():
            record = json.loads(line)
            nll += record[f"{column}_nll"] * record[f"{column}_tokens"]
            tokens += record[f"{column}_tokens"]
if tokens == 0:
    sys.exit(f"{scored}: no scored tokens")
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({"ppl": math.exp(nll / tokens), "nll": nll, "tokens": tokens}, f)

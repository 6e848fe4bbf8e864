"""A per-shard filter for `exec` stages: records as JSONL on stdin, kept records on stdout.

Keeps captions with at least N words (N is the first argument) and adds their word count.
"""
import json
import sys

min_words = int(sys.argv[1])
for line in sys.stdin:
    record = json.loads(line)
    words = len(record["caption"].split())
    if words >= min_words:
        record["words"] = words
        print(json.dumps(record))

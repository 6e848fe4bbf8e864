#!/usr/bin/env bash
# The plugin sandbox against hostile plugins (issue 17): wall time, peak RSS, bytes printed and
# store size per scenario. Needs `cargo build --release` and the test guests:
#   cargo build --release --target wasm32-wasip2 --manifest-path tests/plugins/Cargo.toml --target-dir tests/plugins/target
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LADLE=${LADLE:-$ROOT/target/release/ladle}
WASM=$ROOT/tests/plugins/target/wasm32-wasip2/release/hostile.wasm
W=$(mktemp -d)
cd "$W"
python3 -c 'import json
for i in range(42): print(json.dumps({"id": i, "caption": f"caption {i}"}))' > d.jsonl
pipe() { # name, plugin lines
  printf '[pipeline]\nname = "%s"\n[stages.d]\nkind = "read"\npath = "d.jsonl"\nshard_records = 3\n[stages.f]\nkind = "plugin"\ndata = "d"\nwasm = "%s"\n%b\n[stages.w]\nkind = "write"\ndata = "f"\npath = "o.jsonl"\n' "$1" "$WASM" "$2" > "$1.toml"
}
measure() { # label, pipeline, store
  /usr/bin/time -f "%e s wall, %M KiB peak RSS" -o t.txt "$LADLE" run "$2" --json --store "$3" > out.txt 2> err.txt
  rc=$?
  printf '%-44s exit %d, %s, printed %d bytes, store %s\n' "$1" $rc "$(cat t.txt | tail -1)" $(( $(wc -c < out.txt) + $(wc -c < err.txt) )) "$(du -sh "$3" | cut -f1)"
}
pipe sleep3600 'config = { mode = "sleep", secs = 3600 }\nlimits = { batch_timeout_ms = 2000 }'
pipe sleep5 'config = { mode = "sleep", secs = 5 }\nlimits = { batch_timeout_ms = 2000 }'
measure "sleep 3600 s, deadline 2 s" sleep3600.toml s1
measure "sleep 5 s, deadline 2 s" sleep5.toml s2
grep -o 'asked to sleep[^"]*' out.txt | head -1
pipe huge 'config = { mode = "huge", mb = 60 }'
pipe hugedrop 'config = { mode = "huge", mb = 60 }\non_error = "drop"'
measure "60 MB replacements, 42 records" huge.toml s3
grep -o 'record 0: it replaced[^"]*' out.txt | head -1
measure "60 MB replacements, on_error = drop" hugedrop.toml s4
pipe hugeone 'config = { mode = "huge", mb = 60 }\nbatch_records = 1'
pipe hugeonedrop 'config = { mode = "huge", mb = 60 }\nbatch_records = 1\non_error = "drop"'
measure "  the same, one record per call" hugeone.toml s5
measure "  the same, one record per call, drop" hugeonedrop.toml s6
pipe err0 'config = { mode = "bigerr", mb = 0 }'
pipe err100 'config = { mode = "bigerr", mb = 100 }'
printf '[pipeline]\nname = "other"\n[stages.d]\nkind = "read"\npath = "d.jsonl"\n[stages.w]\nkind = "write"\ndata = "d"\npath = "q.jsonl"\n' > other.toml
for mb in 0 100; do
  measure "err of $mb MiB" err$mb.toml e$mb
  "$LADLE" run other.toml --store e$mb > /dev/null 2>&1
  measure "  then a cached rerun of another pipeline" other.toml e$mb
done
pipe sample 'config = { mode = "sample" }\nbatch_records = 4'
"$LADLE" run sample.toml --store r1 -j 1 > /dev/null 2>&1; cp o.jsonl sample1.jsonl
"$LADLE" run sample.toml --store r2 -j 2 > /dev/null 2>&1
echo "sampling: run 1 kept $(wc -l < sample1.jsonl), run 2 kept $(wc -l < o.jsonl), identical: $(cmp -s sample1.jsonl o.jsonl && echo yes || echo no), distinct draws: $(python3 -c 'import json,sys; print(len({json.loads(l)["draw"] for l in open("o.jsonl")}))')"
rm -rf "$W"

#!/usr/bin/env bash
# A walkthrough of what ladle's cache does, on the bundled example. Run from the repository root:
#   bash examples/rerun-and-resume.sh
# It uses a throw-away store, so it leaves the example's own .ladle/ alone.
set -euo pipefail
cargo build --release --quiet
ladle=target/release/ladle
export LADLE_STORE=$(mktemp -d)/store
work=$(mktemp -d)
cp -r pipelines/. "$work"
p="$work/example.toml"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A cold run computes every stage"
$ladle run "$p"

step "2. A second run computes nothing"
$ladle run "$p"

step "3. Change one parameter: plan says what will rerun, and why"
sed -i 's/lowest = 0.2/lowest = 0.25/' "$p"
$ladle plan "$p"
$ladle run "$p"

step "4. Append records: the per-shard filter recomputes only new shards"
head -n 70 "$work/data/captions.jsonl" | sed 's/"c0/"d0/' >> "$work/data/captions.jsonl"
$ladle run "$p"

step "5. Kill a run half-way (kill -9) and resume it"
sed -i 's/lowest = 0.25/lowest = 0.5/; s/shard_records = 64/shard_records = 8/' "$p"
$ladle run "$p" -j 1 & pid=$!
sleep 1.5; kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
$ladle runs "$p"
$ladle run "$p"

step "6. Look at an output, and check the store"
$ladle show "$p" keep -n 2
$ladle verify "$p"

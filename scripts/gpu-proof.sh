#!/usr/bin/env bash
# The GPU path proven in one command (issue #16): fidelity against the transformers fixtures,
# memory errors and races, the measured roofline, and throughput against transformers, each step
# under its own time limit, then one summary table.
#
#   scripts/gpu-proof.sh                      # on a GPU machine, with dist/ladle-cuda.xz beside it
#   scripts/gpu-proof.sh --device cpu         # the same steps here, on small shapes (the check
#                                             # that on a GPU machine it only has to run)
#   scripts/gpu-proof.sh --steps 1,4 --out DIR --ladle PATH
#
# Steps (each prints JSON lines into $out/stepN.log; the table is $out/summary.txt):
#   1. `ladle bench fixtures` in f32 and in bf16: text, prompted, LLaVA, Qwen2-VL and Qwen2.5-VL
#      perplexities against transformers (1e-4 / 2e-2), greedy generation token for token, and a
#      6000-token record scored in attention blocks;
#   2. `ladle bench matmul` in bf16 (f32 on the CPU): the roofline;
#   3. benches/gpu_vs_transformers.py: Qwen2-7B's shape in bf16 against transformers (sdpa), the
#      same weights and ids (Qwen2-0.5B's widths at 2 layers, f32, on the CPU), needs torch;
#   4. one record of about 6k tokens (the length is drawn, seeded) through Qwen2-7B's shape
#      (2 layers on the CPU): it must score;
#   5. `ladle bench soup` on synthetic checkpoints: GB/s against plain reads;
#   6. benches/llava_vs_transformers.py: image-conditioned scoring at LLaVA-1.5-7B's shape (CLIP
#      ViT-L/14-336 + a 7B LLaMA) in bf16 against transformers' LLaVA (sdpa), the same weights,
#      pixels and ids (2 text and 2 vision layers, f32, on the CPU), needs torch;
#   7. `ladle bench generate`: new tokens/s of the same prompts one at a time and in batches of
#      16, 64 and 128 at Qwen2-7B's shape in bf16 (2 layers, 1 and 8, on the CPU): the
#      `generate` stage's default batch on a GPU (64) checked against its neighbours;
#   8. compute-sanitizer (memcheck, then racecheck) over a 2-layer `ladle bench score`, where
#      installed (GPU only; last: the slowest, and its figures matter least).
# The limits add up past one 10-minute call: on a lent device, run --steps 1,2,3,4,5 and then
# --steps 6,7,8, each in its own call.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
device=cuda
steps=1,2,3,4,5,6,7,8
out="${OUT:-$repo/gpu-proof-out}"
ladle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --ladle) ladle="$2"; shift 2 ;;
        *) echo "gpu-proof.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
cd "$repo"

# The binary: given, or unpacked from dist/ (xz; Python's lzma when there is no xz), or the
# release build here.
if [ -z "$ladle" ]; then
    if [ -f dist/ladle-cuda.xz ]; then
        ladle=/tmp/ladle-cuda
        if command -v xz >/dev/null; then
            xz -dc dist/ladle-cuda.xz > "$ladle"
        else
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                dist/ladle-cuda.xz "$ladle"
        fi
        chmod +x "$ladle"
    else
        ladle="$repo/target/release/ladle"
    fi
fi
[ -x "$ladle" ] || { echo "no ladle binary at $ladle: build one (cargo build --release, or scripts/build-cuda.sh)" >&2; exit 2; }

if [ "$device" != cpu ]; then
    # CUDA 13's runtime libraries, as a PyTorch for CUDA 13 carries them (docs/cuda.md).
    libs="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)"
    if [ -z "$libs" ] || [ ! -d "$libs" ]; then
        libs="$(dirname "$(find / -name 'libcublas.so.13*' -print -quit 2>/dev/null)")"
    fi
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
    echo "GPU: $(cat "$out/gpu.txt"); libraries from $libs"
    missing="$(ldd "$ladle" | grep 'not found')"
    [ -z "$missing" ] || { echo "the binary cannot load:"; echo "$missing"; exit 2; }
fi

export ladle device out
half=bf16
[ "$device" = cpu ] && half=f32
declare -a rows
# step N NAME LIMIT_S COMMAND...: runs it under `timeout`, its output into stepN.log.
step() {
    local n="$1" name="$2" limit="$3"
    shift 3
    case ",$steps," in *",$n,"*) ;; *) return ;; esac
    echo "== step $n: $name (limit ${limit}s)"
    local t0=$SECONDS
    # Through bash, so that a step may be one of the functions below (exported with -f).
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$out/step$n.log" 2>&1
    local rc=$?
    local verdict=ok
    case $rc in
        0) ;;
        3) verdict="NOT RUN (see log)" ;;
        124 | 137) verdict="TIMED OUT" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    tail -n 25 "$out/step$n.log"
    rows+=("$(printf '%-2s %-44s %-16s %5ss' "$n" "$name" "$verdict" "$((SECONDS - t0))")")
}

fixtures() {
    "$ladle" bench fixtures --device "$device" --dtype f32 || return
    [ "$device" = cpu ] || "$ladle" bench fixtures --device "$device" --dtype bf16
}
export -f fixtures
step 1 "fixtures (f32, then bf16 on a GPU)" 150 fixtures

if [ "$device" = cpu ]; then
    step 2 "bench matmul ($half, 1024)" 60 "$ladle" bench matmul --device cpu --dtype "$half" --size 1024
else
    step 2 "bench matmul ($half, 8192)" 60 "$ladle" bench matmul --device "$device" --dtype "$half"
fi

# The comparisons with transformers need torch and transformers in python3; a step without them
# is NOT RUN (exit 3), not failed.
has_torch() {
    python3 -c 'import torch, transformers' 2>/dev/null && return
    echo "python3 here has no torch/transformers: the comparison needs both"
    return 3
}
export -f has_torch

versus() {
    has_torch || return
    if [ "$device" = cpu ]; then
        python3 benches/gpu_vs_transformers.py --ladle "$ladle" --shape qwen2-0.5b --layers 2 --device cpu \
            --dtype f32 --sequences 32 --length 60 --batch-tokens 1024 --work /tmp/ladle-proof-model
    else
        python3 benches/gpu_vs_transformers.py --ladle "$ladle" --shape qwen2-7b --device "$device" --dtype bf16 \
            --sequences 1024 --length 120 --batch-tokens 16384 --work /tmp/ladle-proof-model
    fi
    local rc=$?
    rm -rf /tmp/ladle-proof-model
    return $rc
}
export -f versus
step 3 "scoring vs transformers" 240 versus

if [ "$device" = cpu ]; then
    step 4 "one ~6k-token record (2 layers, CPU)" 240 "$ladle" bench score --shape qwen2-0.5b --layers 2 \
        --device cpu --sequences 1 --length 6144 --batch-tokens 8192
else
    step 4 "one ~6k-token record, Qwen2-7B shape" 120 "$ladle" bench score --shape qwen2-7b --device "$device" \
        --dtype bf16 --sequences 1 --length 6144 --batch-tokens 8192
fi

soup() {
    if [ "$device" = cpu ]; then
        "$ladle" bench soup --make 2 --size-gb 0.25 --repeat 1 --work /tmp/ladle-proof-soup
    else
        "$ladle" bench soup --make 4 --size-gb 3 --repeat 2 --work /tmp/ladle-proof-soup
    fi
    local rc=$?
    rm -rf /tmp/ladle-proof-soup
    return $rc
}
export -f soup
step 5 "bench soup" 120 soup

llava() {
    has_torch || return
    if [ "$device" = cpu ]; then
        python3 benches/llava_vs_transformers.py --ladle "$ladle" --device cpu --dtype f32 --layers 2 \
            --vision-layers 2 --records 8 --batch-tokens 2048 --work /tmp/ladle-proof-llava
    else
        python3 benches/llava_vs_transformers.py --ladle "$ladle" --device "$device" --dtype bf16 \
            --records 256 --batch-tokens 16384 --work /tmp/ladle-proof-llava
    fi
    local rc=$?
    rm -rf /tmp/ladle-proof-llava
    return $rc
}
export -f llava
step 6 "image-conditioned scoring vs transformers" 300 llava

if [ "$device" = cpu ]; then
    step 7 "bench generate (2 layers, batch 1 and 8)" 120 "$ladle" bench generate --shape qwen2-0.5b --layers 2 \
        --device cpu --prompts 16 --new-tokens 8 --batch 1,8
else
    step 7 "bench generate, Qwen2-7B shape, batches" 120 "$ladle" bench generate --shape qwen2-7b \
        --device "$device" --dtype bf16 --prompts 128 --new-tokens 16 --batch 1,16,64,128
fi

sanitize() {
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer is not installed here: nothing checked"
        return 3
    fi
    for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$ladle" bench score --shape qwen2-0.5b --layers 2 \
            --device "$device" --dtype bf16 --sequences 8 --length 40 --batch-tokens 256 || return
    done
}
export -f sanitize
if [ "$device" != cpu ]; then
    step 8 "compute-sanitizer memcheck+racecheck" 150 sanitize
fi

{
    echo "gpu-proof on $device ($(cat "$out/gpu.txt" 2>/dev/null || uname -m)), $(date -u +%FT%TZ)"
    printf '%s\n' "${rows[@]}"
    echo
    echo "figures (last JSON line of each step):"
    for f in "$out"/step*.log; do
        echo "$(basename "$f" .log): $(grep -E '^\{' "$f" | tail -n 1 | cut -c1-600)"
        grep -E '^ladle .* (tok|records)/s' "$f"
    done
} | tee "$out/summary.txt"

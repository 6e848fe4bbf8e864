#!/usr/bin/env bash
# The test command (the README's, and what .ci/run runs): sets up what the tests need on a fresh
# machine, runs every test of the workspace, and stops what it started.
#  - the wasm32-wasip2 target (plugin tests build WASM guests);
#  - a one-node Slurm cluster on loopback for tests/slurm.rs (scripts/slurm/loopback-up.sh: Debian's
#    slurmctld, slurmd and munge, installed where missing; needs root, or sudo without a password).
#    LADLE_SKIP_SLURM=1 skips the cluster and the Slurm tests on purpose;
#  - componentize-py (PyPI), which builds the Python plugins the plugin tests use;
#  - Chromium, for the test that opens `ladle report`'s page in a real browser (Debian's
#    `chromium`, installed where missing). Where it cannot be installed, LADLE_NO_CHROMIUM says why
#    and that test says it skipped.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

if [ "$(id -u)" = 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(false); fi

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  if [ "${as_root[0]:-}" = false ]; then
    export LADLE_NO_CHROMIUM="Chromium is not installed and installing it needs root (or passwordless sudo)"
  elif ! { "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 \
           || { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }; }; then
    export LADLE_NO_CHROMIUM="apt-get install chromium failed (see above)"
  fi
fi

# componentize-py builds the Python plugins the tests use (plugins/examples/python, the hostile
# Python guest); the version the Python SDK is tested with, in a venv of its own where missing.
if ! command -v componentize-py >/dev/null; then
  venv=target/componentize-py
  if [ ! -x "$venv/bin/componentize-py" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "componentize-py==0.25.1"
  fi
  export PATH="$PWD/$venv/bin:$PATH"
fi

if [ "${LADLE_SKIP_SLURM:-0}" != 1 ]; then
  if [ "${as_root[0]:-}" = false ]; then
    echo "error: the Slurm tests need a loopback cluster, which scripts/slurm/loopback-up.sh starts as root" >&2
    echo "  hint: run this as root (or with passwordless sudo), or set LADLE_SKIP_SLURM=1 to skip them" >&2
    exit 1
  fi
  "${as_root[@]}" scripts/slurm/loopback-up.sh || {
    echo "error: the loopback Slurm cluster did not start (scripts/slurm/loopback-up.sh above says why)" >&2
    exit 1
  }
  trap '"${as_root[@]}" scripts/slurm/loopback-down.sh' EXIT
fi

cargo test --workspace --locked "$@"

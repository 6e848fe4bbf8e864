#!/usr/bin/env bash
# The test command (the README's, and what .ci/run runs): sets up what the tests need on a fresh
# machine, runs every test of the workspace, and stops what it started.
#  - the wasm32-wasip2 target (plugin tests build WASM guests);
#  - a one-node Slurm cluster on loopback for tests/slurm.rs (scripts/slurm/loopback-up.sh: Debian's
#    slurmctld, slurmd and munge, installed where missing; needs root, or sudo without a password).
#    LADLE_SKIP_SLURM=1 skips the cluster and the Slurm tests on purpose.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

if [ "${LADLE_SKIP_SLURM:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else
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

#!/usr/bin/env bash
# The loopback cluster of ../shared/slurm (a tested recipe), kept in the repo so the test command can stop it.
# Stops the daemons started by setup.sh, by the PIDs recorded in $BASE/pids.env (never by name).
# Only daemons marked *_OWNED=1 are stopped; a PID is signalled only if /proc/PID/comm still matches.
# --purge also deletes the Slurm state/log folders under $BASE.
set -uo pipefail
BASE=${SLURM_LOOPBACK_DIR:-/tmp/slurm-loopback}
PIDS="$BASE/pids.env"
[ -r "$PIDS" ] || { echo "no $PIDS: nothing to stop"; exit 0; }
get() { sed -n "s/^$1=//p" "$PIDS"; }
alive() { [ -n "${1:-}" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }
stop() { # stop NAME PID
  local name=$1 pid=$2
  if ! alive "$pid" "$name"; then echo "$name (pid ${pid:-?}) not running"; return; fi
  kill -TERM "$pid"
  for _ in $(seq 100); do alive "$pid" "$name" || { echo "stopped $name (pid $pid)"; return; }; sleep 0.1; done
  echo "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
}
# cancel remaining jobs so that no slurmstepd / job processes outlive slurmd
if [ "$(get SLURMCTLD_OWNED)" = 1 ] && alive "$(get SLURMCTLD_PID)" slurmctld; then
  scancel --quiet --partition=debug 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
fi
[ "$(get SLURMD_OWNED)" = 1 ] && stop slurmd "$(get SLURMD_PID)"
[ "$(get SLURMCTLD_OWNED)" = 1 ] && stop slurmctld "$(get SLURMCTLD_PID)"
[ "$(get MUNGED_OWNED)" = 1 ] && stop munged "$(get MUNGED_PID)"
rm -f "$PIDS"
if [ "${1:-}" = --purge ]; then rm -rf "$BASE/ctld" "$BASE/slurmd" "$BASE/log" "$BASE/run"; echo "purged state under $BASE"; fi

#!/usr/bin/env bash
# Runs every benchmark with its defaults and writes benchmarks/results.json and results.md.
#
#   benchmarks/run_all.sh                 # fleet none (N=1000), fleet pc (N=100) with libvirt, QMP rate
#   benchmarks/run_all.sh --no-libvirt    # skip libvirt (it installs and starts libvirtd)
#   PYTHON=/path/to/python benchmarks/run_all.sh
#   FLEET_NONE_ARGS="--n 20" FLEET_PC_ARGS="--n 10" QMP_ARGS="--repeat 1" benchmarks/run_all.sh   # a quick check
#
# Other arguments are passed to both fleet runs (e.g. --repeat 3).
# Run it on a quiet machine: the ratios compare backends measured in the same run, but other
# load on the machine still skews them. Each backend runs in a fresh interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LIBVIRT="--libvirt"
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --no-libvirt) LIBVIRT="" ;;
    *) EXTRA+=("$arg") ;;
  esac
done
out="benchmarks/.out"
rm -rf "$out"
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$PY" -m pip install -q -r benchmarks/requirements.txt 2>/dev/null \
  || echo "run_all: qemu.qmp could not be installed; it is reported as not installed" >&2

status=0
# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
"$PY" benchmarks/fleet.py --machine none ${FLEET_NONE_ARGS:-} ${EXTRA[@]+"${EXTRA[@]}"} \
  --json-out "$out/fleet_none.json" --md-out "$out/fleet_none.md" || status=1
# shellcheck disable=SC2086
"$PY" benchmarks/fleet.py --machine pc $LIBVIRT ${FLEET_PC_ARGS:-} ${EXTRA[@]+"${EXTRA[@]}"} \
  --json-out "$out/fleet_pc.json" --md-out "$out/fleet_pc.md" || status=1
# shellcheck disable=SC2086
"$PY" benchmarks/qmp_rate.py ${QMP_ARGS:-} \
  --json-out "$out/qmp_rate.json" --md-out "$out/qmp_rate.md" || status=1

"$PY" benchmarks/merge_results.py benchmarks/results.json benchmarks/results.md \
  "fleet_none=$out/fleet_none.json:$out/fleet_none.md" \
  "fleet_pc=$out/fleet_pc.json:$out/fleet_pc.md" \
  "qmp_rate=$out/qmp_rate.json:$out/qmp_rate.md"
rm -rf "$out"
exit "$status"

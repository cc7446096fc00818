#!/usr/bin/env bash
# Runs every benchmark with its defaults and writes benchmarks/results.json and results.md.
#
#   benchmarks/run_all.sh                 # fleet none (N=1000), fleet pc (N=100) with libvirt, QMP rate
#   benchmarks/run_all.sh --no-libvirt    # skip libvirt (it installs and starts libvirtd)
#   benchmarks/run_all.sh --repeat 5      # every backend 5 times, interleaved (default 3)
#   benchmarks/run_all.sh --quick         # one repeat: a first look, not figures to quote
#   PYTHON=/path/to/python benchmarks/run_all.sh
#   FLEET_NONE_ARGS="--n 20" FLEET_PC_ARGS="--n 10" benchmarks/run_all.sh --quick   # a smoke test
#
# Each table shows medians over the repeats, and each ratio as the median (min-max) of the
# ratios of each repeat (every repeat runs the baseline beside aiovirt). Other arguments are
# passed to both fleet runs.
# Run it on a quiet machine: the ratios compare backends measured in the same run, but other
# load on the machine still skews them. Each backend runs in a fresh interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LIBVIRT="--libvirt"
REPEAT=3
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-libvirt) LIBVIRT="" ;;
    --quick) REPEAT=1 ;;
    --repeat) REPEAT="${2:-}"; [ $# -gt 1 ] && shift ;;
    --repeat=*) REPEAT="${1#--repeat=}" ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done
case "$REPEAT" in ''|*[!0-9]*|0) echo "run_all: --repeat needs a positive number" >&2; exit 2 ;; esac
out="benchmarks/.out"
rm -rf "$out"
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$PY" -m pip install -q -r benchmarks/requirements.txt 2>/dev/null \
  || echo "run_all: qemu.qmp could not be installed; it is reported as not installed" >&2

status=0
# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
"$PY" benchmarks/fleet.py --machine none --repeat "$REPEAT" ${FLEET_NONE_ARGS:-} ${EXTRA[@]+"${EXTRA[@]}"} \
  --json-out "$out/fleet_none.json" --md-out "$out/fleet_none.md" || status=1
# shellcheck disable=SC2086
"$PY" benchmarks/fleet.py --machine pc --repeat "$REPEAT" $LIBVIRT ${FLEET_PC_ARGS:-} ${EXTRA[@]+"${EXTRA[@]}"} \
  --json-out "$out/fleet_pc.json" --md-out "$out/fleet_pc.md" || status=1
# shellcheck disable=SC2086
"$PY" benchmarks/qmp_rate.py --repeat "$REPEAT" ${QMP_ARGS:-} \
  --json-out "$out/qmp_rate.json" --md-out "$out/qmp_rate.md" || status=1

"$PY" benchmarks/merge_results.py benchmarks/results.json benchmarks/results.md \
  "fleet_none=$out/fleet_none.json:$out/fleet_none.md" \
  "fleet_pc=$out/fleet_pc.json:$out/fleet_pc.md" \
  "qmp_rate=$out/qmp_rate.json:$out/qmp_rate.md"
rm -rf "$out"
exit "$status"

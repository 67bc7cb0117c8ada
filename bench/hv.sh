#!/usr/bin/env bash
# Issue-5 proof: the example kernel unmodified vs pre-virtualized (runtime `hv` backend) on the
# in-tree hypervisor, one run each, same VMM, same command line.
#
#   bash bench/hv.sh [KERNEL-ARGS] [--json]
#
# Runs `previrt demo` (release build): toolchain install, plain and CROSS_COMPILE builds of
# examples/kernel, `previrt link`, then `previrt run --stats-json` of both. Prints exits by
# category (console, timer/pic, interrupt-flag) and by VMM exit reason with the ratio
# unmodified/previrt, wall time of each run, each workload's TIMING (TSC cycles) side by side,
# and whether the WORKLOAD/CONSOLE/RESULT lines (verdicts, checksums) are identical.
# Targets (issue 5): >= 20x fewer exits overall, 0 interrupt-flag exits, >= 50x fewer console
# exits, identical verdicts and checksums. Exit status: previrt demo's (0 identical, 1 differ).
set -eu
cd "$(dirname "$0")/.."
args=() json=()
for a in "$@"; do
  case "$a" in
    --json) json=(--json) ;;
    *) args+=("$a") ;;
  esac
done
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-hv.XXXXXX")
trap 'rm -rf "$work"' EXIT
cargo build --quiet --release --bin previrt
target/release/previrt demo --work "$work" --append "${args[*]:-hz=100}" "${json[@]}"

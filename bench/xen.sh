#!/usr/bin/env bash
# Xen PV boot-to-verdict time (issue 6; target <= 1.5 s from QEMU start to the verdict).
#
#   bash bench/xen.sh [RUNS]
#
# Builds the example kernel with the previrt toolchain, links it (`previrt link`, Xen PV notes
# included) and boots it as dom0 of Xen 4.17 under QEMU TCG with scripts/xen-run.sh, RUNS
# times (default 3) each:
#   floor  = `workloads=compute compute=1`: Xen's own boot + the runtime's start of day + exit,
#   full   = the default workload list,
# and prints the median wall time of both, the workloads' share (full - floor), the target
# ratio, the kernel's TIMING lines and the runtime's exit summary (sites executed per kind,
# hypercalls by name) of the last full run. The machine is shared: compare figures taken in one
# run, not across runs.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-xen.XXXXXX")
trap 'rm -rf "$work"' EXIT

cargo build --quiet --release --bin previrt
previrt=target/release/previrt
"$previrt" toolchain install --prefix "$work/tc" >/dev/null
make -s -C examples/kernel O="$work/k" CROSS_COMPILE="$work/tc/bin/x86_64-previrt-linux-gnu-"
"$previrt" link "$work/k/kernel-pvh.elf" -o "$work/linked.elf" >/dev/null

# Median of the "verdict after N ms" figures of RUNS runs with command line $1.
median_ms() {
  local cmdline=$1 i ms all=()
  for i in $(seq "$runs"); do
    ms=$(scripts/xen-run.sh "$work/linked.elf" "$cmdline" 2>&1 >"$work/out" | sed -n 's/^xen-run: verdict after \([0-9]*\) ms$/\1/p')
    grep -q '^RESULT PASS' "$work/out" || { echo "bench/xen: run failed ($cmdline):" >&2; tail -20 "$work/out" >&2; exit 1; }
    all+=("$ms")
  done
  printf '%s\n' "${all[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p"
}

floor=$(median_ms "workloads=compute compute=1")
full=$(median_ms "")
printf '%-34s %8s\n' "Xen PV dom0, QEMU TCG (median of $runs)" "ms"
printf '%-34s %8d\n' "floor (boot, start of day, exit)" "$floor"
printf '%-34s %8d\n' "full (all default workloads)" "$full"
printf '%-34s %8d\n' "workloads' share" "$((full - floor))"
printf '%-34s %8s\n' "target" "1500"
awk -v f="$full" 'BEGIN { printf "%-34s %8.2fx\n", "full / target", f / 1500 }'
echo
grep -E '^(TIMING|previrt)' "$work/out"

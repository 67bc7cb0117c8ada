#!/usr/bin/env bash
# Xen PV boot-to-verdict time (issue 6; target <= 1.5 s from QEMU start to the verdict).
#
#   bash bench/xen.sh [RUNS] [CMDLINE]
#
# Builds the example kernel with the previrt toolchain, links it (`previrt link`, Xen PV notes
# included), the same kernel built with its page-table and MMIO annotations (`previrt annotate`
# of a plain build, `gcc --annotations`: direct page tables, docs/xen-pv.md), the reference tiny
# PV kernel (tests/xen_fixtures/tiny-pv.S: no runtime, prints one line and exits), and boots the
# three as dom0 of Xen 4.17 under QEMU TCG with scripts/xen-run.sh, in turn, RUNS times each
# (default 5). The kernel's command line is CMDLINE (default: empty, every workload at the
# kernel's default sizes; tests/xen_pv.rs checks the results of both that and
# `ticks=10 console_lines=8 irqflag_rounds=512` against bare metal).
#
# Prints the median of each phase, taken from arrival times of serial lines (ms since
# xen-run.sh started QEMU):
#   qemu+bios  first line of Xen
#   xen        Xen's boot up to its wall-clock read
#   rtc        the wall-clock read: Xen waits for the RTC's next update (a second boundary
#              of QEMU's RTC, counted from VM start with -rtc clock=vm), 0-1000 ms
#   dom0       the rest of Xen's boot and the dom0 build
#   start      Xen's hand-over to the runtime's boot line (start of day, patching)
#   kernel     the kernel's boot line to RESULT (all workloads)
#   total      QEMU start to QEMU exit (xen-run.sh's "verdict after")
#   total-rtc  total without the rtc phase (Xen's wall-clock read waits 0-1000 ms depending on
#              where QEMU's RTC second boundary falls; the same for any kernel)
# then the ratio of the medians (ours / reference, and ours / the 1.5 s target), the load
# average before and after, and the last run's per-workload TIMING lines and exit summary.
# The machine is shared: compare figures taken in one run, not across runs.
set -eu
cd "$(dirname "$0")/.."
runs=${1:-5}
cmdline=${2-}
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-xen.XXXXXX")
trap 'rm -rf "$work"' EXIT

cargo build --quiet --release --bin previrt
previrt=target/release/previrt
"$previrt" toolchain install --prefix "$work/tc" >/dev/null
make -s -C examples/kernel O="$work/k" CROSS_COMPILE="$work/tc/bin/x86_64-previrt-linux-gnu-"
"$previrt" link "$work/k/kernel-pvh.elf" -o "$work/linked.elf" >/dev/null
make -s -C examples/kernel O="$work/plain"
"$previrt" annotate "$work/plain/kernel-pvh.elf" -o "$work/ann.json" >/dev/null
make -s -C examples/kernel O="$work/ka" CROSS_COMPILE="$work/tc/bin/x86_64-previrt-linux-gnu-" \
  CC="$work/tc/bin/x86_64-previrt-linux-gnu-gcc --annotations $work/ann.json"
"$previrt" link "$work/ka/kernel-pvh.elf" -o "$work/annotated.elf" >/dev/null
gcc -c tests/xen_fixtures/tiny-pv.S -o "$work/tiny-pv.o"
ld -m elf_x86_64 -static -nostdlib --no-warn-rwx-segments -T tests/xen_fixtures/tiny-pv.ld \
  -o "$work/tiny-pv.elf" "$work/tiny-pv.o"

# One run: KERNEL CMDLINE -> "qemu+bios xen rtc dom0 start kernel total" (ms) on stdout; the
# timestamped serial output is left in $work/out.
run() {
  local start
  start=$(date +%s%N)
  scripts/xen-run.sh "$1" "$2" 2>&1 |
    perl -MTime::HiRes=time -ne "BEGIN { \$s = $start / 1e9 } printf '%d %s', (time - \$s) * 1000, \$_" >"$work/out"
  grep -q ' RESULT PASS' "$work/out" || { echo "bench/xen: run failed ($1 $2):" >&2; tail -20 "$work/out" >&2; exit 1; }
  awk '
    !first && /\(XEN\)/ { first = $1 }
    /Allocated console ring/ { rtc_end = $1; rtc_start = prev }
    /Freed .* init memory/ { dom0 = $1 }
    /^[0-9]+ previrt: backend=/ { boot = $1 }
    /^[0-9]+ RESULT / { result = $1 }
    /xen-run: verdict after/ { total = $(NF - 1) }
    { prev = $1 }
    END {
      if (!boot) boot = dom0   # the reference kernel has no runtime
      print first, rtc_start - first, rtc_end - rtc_start, dom0 - rtc_end, boot - dom0, result - boot, total,
        total - (rtc_end - rtc_start)
    }' "$work/out"
}

median() { sort -n | sed -n "$(((runs + 1) / 2))p"; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$work/ref" && : >"$work/ours" && : >"$work/annotated"
for _ in $(seq "$runs"); do
  run "$work/tiny-pv.elf" "" >>"$work/ref"
  run "$work/annotated.elf" "$cmdline" >>"$work/annotated"
  run "$work/linked.elf" "$cmdline" >>"$work/ours"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cols=(qemu+bios xen rtc dom0 start kernel total total-rtc)
printf '%-36s' "Xen PV dom0, QEMU TCG (median of $runs, ms)"
printf '%10s' "${cols[@]}"
echo
declare -A labels=([ref]="reference tiny PV kernel" [annotated]="previrt, annotated (direct tables)"
  [ours]="previrt example kernel (shadowed)")
for which in ref annotated ours; do
  printf '%-36s' "${labels[$which]}"
  for c in $(seq ${#cols[@]}); do printf '%10d' "$(cut -d' ' -f"$c" "$work/$which" | median)"; done
  echo
done
for col in 7 8; do
  ref=$(cut -d' ' -f$col "$work/ref" | median)
  for which in ours annotated; do
    awk -v r="$ref" -v o="$(cut -d' ' -f$col "$work/$which" | median)" -v l="${labels[$which]}" \
      -v c="${cols[col - 1]}" 'BEGIN {
      printf "%-36s %-9s %.2fx the reference, %.2fx the 1500 ms target\n", l, c, o / r, o / 1500 }'
  done
done
for which in ref annotated ours; do
  echo "every run's total (ms), ${labels[$which]}: $(cut -d' ' -f7 "$work/$which" | tr '\n' ' ')"
done
echo "kernel command line: '$cmdline'; load average before: $load_before, after: $load_after (2 cores)"
echo
grep -E '^[0-9]+ (TIMING|previrt)' "$work/out" | cut -d' ' -f2-
echo
echo "annotated kernel's page tables (last run):"
run "$work/annotated.elf" "$cmdline" >/dev/null
grep -E '^[0-9]+ previrt-xen: (page tables|hypercalls)' "$work/out" | cut -d' ' -f2-

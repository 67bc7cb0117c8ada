#!/usr/bin/env bash
# The floor this host's traps put under the example kernel's `pagetable` workload on the pvm
# backend (issue 10: pvm is slower than QEMU TCG there). One run measures, side by side:
#
#   bash bench/pvm_floor.sh [N [RUNS]] [--json]
#
# 1. What one host event costs a native guest (bench/pvm_costs.S, linked with
#    bench/pvm_guest.S): TSC cycles per event class, each event timed alone, N samples
#    (default 2000) per class and run; per class the median of RUNS runs' medians (default 5),
#    minus the empty window's. Beside it KVM's counters for the cost guest, per sample, which
#    check that each class is the event it is named after.
# 2. The events of one warm `pagetable` iteration under pvm: the pre-virtualized example
#    kernel under `previrt run --backend native` with `previrt.backend=pvm workloads=pagetable
#    hz=100 repeat=1`, then `repeat=9`; (repeat=9 - repeat=1) / 8 of KVM's counters (the stats
#    JSON's "kvm" object), of the runtime's exit line (`previrt-pvm: ... cr3-loads=N ...
#    invlpg-flushes=N`) and of the host's kvmmmu:kvm_mmu_unsync_page tracepoint (a write fault
#    on a shadowed leaf table the host had synced; counted in a tracefs instance that follows
#    this script's children: needs root).
# 3. pvm's and QEMU TCG's time for the workload by the kernel's TIMING lines: one iteration
#    alone (repeat=1) and warm (iterations 2-9 of repeat=9: min and median).
# 4. Two floors per warm iteration, from 1 x 2 (nothing hard-coded):
#    (a) conservative, what no runtime could avoid on this host even if every privileged
#        operation were a hypercall as cheap as the cheapest trap: faults delivered x #PF round
#        trip + (invlpg flushes + CR3 loads) x `int $0x1a` + other host faults fixed (first
#        access through a changed translation: KVM pf_fixed - write faults) x the re-fault;
#    (b) this host's mechanisms: faults delivered x #PF + flushes x invlpg + CR3 loads x CR3
#        load + write faults x write fault + other host faults fixed x the re-fault;
#    beside pvm and TCG, with ratios. The machine's load average (1 min) at start and end.
set -eu
cd "$(dirname "$0")/.."
. bench/pvm_common.sh
pvm_args "$@"
n=${args[0]:-2000}
runs=${args[1]:-5}
case "$n $runs" in *[!0-9\ ]*|0\ *|*\ 0) echo "usage: $0 [N (1-4096) [RUNS]] [--json]" >&2; exit 2 ;; esac
[ "$n" -le 4096 ] || { echo "$0: N is at most 4096 (bench/pvm_costs.S's sample buffer)" >&2; exit 2; }
tracing=/sys/kernel/tracing/instances/previrt-floor-$$
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-floor.XXXXXX")
trap 'rm -rf "$work"; [ ! -d "$tracing" ] || rmdir "$tracing"' EXIT
load_start=$(cut -d' ' -f1 /proc/loadavg)

# The write-fault count: a tracefs instance that follows this shell's children.
mkdir "$tracing" 2>/dev/null || { echo "$0: cannot create a tracefs instance under /sys/kernel/tracing (needs root)" >&2; exit 2; }
echo 1 >"$tracing/options/event-fork"
echo 1 >"$tracing/events/kvmmmu/kvm_mmu_unsync_page/enable"
echo $$ >"$tracing/set_event_pid"

pvm_build
pvm_guest "$work/costs" bench/pvm_costs.S

trace_reset() { : >"$tracing/trace"; }
# kvm_mmu_unsync_page events since trace_reset; fails if the buffer dropped any.
trace_count() {
  local head
  head=$(sed -n 's/^# entries-in-buffer\/entries-written: \([0-9]*\)\/\([0-9]*\).*/\1 \2/p' "$tracing/trace")
  [ "${head% *}" = "${head#* }" ] || { echo "$0: tracefs dropped events ($head)" >&2; exit 1; }
  grep -c ' kvm_mmu_unsync_page:' "$tracing/trace" || true
}
# KVM counter $2 in stats JSON $1.
kvm_stat() { sed -n '/"kvm": {/,/}/ s/^ *"'"$2"'": *\([0-9]*\).*/\1/p' "$1"; }
# Runtime exit-line counter $2 in run output $1.
pvm_stat() { sed -n 's/^previrt-pvm: .* '"$2"'=\([0-9]*\).*/\1/p' "$1"; }

# 1. Event costs.
classes="rdtsc trap cr3 pf write write2 invlpg touch"
declare -A med
checks="pf_guest invlpg pf_fixed unsync"
declare -A check
for r in $(seq "$runs"); do
  trace_reset
  "$previrt" run "$work/costs" --backend native --append "$n" --stats-json "$work/c.json" >"$work/c.out" 2>&1 || true
  grep -q "^mode=native result=costs n=$n\$" "$work/c.out" && [ "$(grep -c ' median=' "$work/c.out")" = 8 ] ||
    { echo "$0: the cost guest failed (mode line, or an exit status other than 1):" >&2; cat "$work/c.out" >&2; exit 1; }
  for c in $classes; do
    med[$c]="${med[$c]:-} $(sed -n "s/^$c median=\([0-9]*\) .*/\1/p" "$work/c.out")"
  done
  if [ "$r" = 1 ]; then
    for k in pf_guest invlpg pf_fixed; do check[$k]=$(kvm_stat "$work/c.json" "$k"); done
    check[unsync]=$(trace_count)
  fi
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
declare -A cost
overhead=$(echo "${med[rdtsc]}" | median)
for c in $classes; do
  cost[$c]=$(( $(echo "${med[$c]}" | median) - overhead ))
  [ "${cost[$c]}" -ge 0 ] || cost[$c]=0
done
per_sample() { echo "$1 $n" | awk '{ printf "%.2f", $1 / $2 }'; }
# Each class is one event of its kind: one pf_guest (pf), one invlpg, two pf_fixed (write +
# touch) and one unsync (write) per sample; a host that counts otherwise breaks the floors'
# attribution, so say so.
for c in pf_guest:1 invlpg:1 pf_fixed:2 unsync:1; do
  echo "$(per_sample "${check[${c%:*}]}") ${c#*:}" | awk '{ exit !($1 < $2 * 0.95 || $1 > $2 * 1.05) }' &&
    echo "$0: WARNING: the cost guest counts ${c%:*} $(per_sample "${check[${c%:*}]}") per sample, not ${c#*:}: the costs may not be the events they are named after" >&2
done

# 2. Events per warm iteration, 3. pvm's and TCG's times.
declare -A cnt ev
for reps in 1 9; do
  trace_reset
  krun pvm "workloads=pagetable hz=100 repeat=$reps" >/dev/null
  cp "$work/k.out" "$work/pvm.$reps"
  for k in pf_guest pf_fixed pf_taken invlpg insn_emulation exits; do cnt[$reps.$k]=$(kvm_stat "$work/k.json" "$k"); done
  for k in cr3-loads invlpg-flushes; do cnt[$reps.$k]=$(pvm_stat "$work/k.out" "$k"); done
  cnt[$reps.unsync]=$(trace_count)
done
for k in pf_guest pf_fixed pf_taken invlpg insn_emulation exits cr3-loads invlpg-flushes unsync; do
  ev[$k]=$(echo "${cnt[9.$k]} ${cnt[1.$k]}" | awk '{ printf "%.1f", ($1 - $2) / 8 }')
done
ev[refault]=$(echo "${ev[pf_fixed]} ${ev[unsync]}" | awk '{ printf "%.1f", $1 - $2 }')
# "single warm_min warm_median" TSC cycles of set-up $1 ($1.1 / $1.9 runs' TIMING lines).
times() {
  local single
  single=$(sed -n 's/^TIMING pagetable seq=1 tsc=//p' "$work/$1.1")
  sed -n 's/^TIMING pagetable seq=\([2-9]\) tsc=//p' "$work/$1.9" | sort -n |
    awk -v s="$single" '{ a[NR] = $1 } END { print s, a[1], a[int((NR + 1) / 2)] }'
}
for reps in 1 9; do
  krun qemu "workloads=pagetable hz=100 repeat=$reps" >/dev/null
  cp "$work/k.out" "$work/qemu.$reps"
done
read -r pvm_single pvm_wmin pvm_wmed <<<"$(times pvm)"
read -r tcg_single tcg_wmin tcg_wmed <<<"$(times qemu)"

# 4. The floors: per term, the event's count and the cost class each floor charges for it.
terms="pf_guest:pf:pf invlpg-flushes:trap:invlpg cr3-loads:trap:cr3 unsync:none:write refault:touch:touch"
cost[none]=0
declare -A part
floor_a=0 floor_b=0
for t in $terms; do
  IFS=: read -r e ca cb <<<"$t"
  part[$e.a]=$(echo "${ev[$e]} ${cost[$ca]}" | awk '{ printf "%.0f", $1 * $2 }')
  part[$e.b]=$(echo "${ev[$e]} ${cost[$cb]}" | awk '{ printf "%.0f", $1 * $2 }')
  floor_a=$((floor_a + part[$e.a])) floor_b=$((floor_b + part[$e.b]))
done
load_end=$(cut -d' ' -f1 /proc/loadavg)
ms() { echo "$1 $tsc_per_ns" | awk '{ printf "%.3f", $1 / $2 / 1e6 }'; }
ratio() { echo "$1 $2" | awk '{ printf "%.2f", $1 / $2 }'; }
rows="pvm_warm_median pvm_warm_min pvm_single tcg_warm_median tcg_warm_min tcg_single"
declare -A row=([pvm_warm_median]=$pvm_wmed [pvm_warm_min]=$pvm_wmin [pvm_single]=$pvm_single
  [tcg_warm_median]=$tcg_wmed [tcg_warm_min]=$tcg_wmin [tcg_single]=$tcg_single)
events="pf_guest invlpg-flushes cr3-loads unsync refault pf_fixed invlpg pf_taken insn_emulation exits"

if [ "$json" = 1 ]; then
  printf '{"samples":%s,"runs":%s,"tsc_per_ns":%s,"load":{"start":%s,"end":%s},"window_overhead_cycles":%s,' \
    "$n" "$runs" "$tsc_per_ns" "$load_start" "$load_end" "$overhead"
  printf '"cost_cycles":{'; sep=""
  for c in $classes; do [ "$c" = rdtsc ] || { printf '%s"%s":%s' "$sep" "$c" "${cost[$c]}"; sep=,; }; done
  printf '},"cost_guest_per_sample":{'; sep=""
  for k in $checks; do printf '%s"%s":%s' "$sep" "$k" "$(per_sample "${check[$k]}")"; sep=,; done
  printf '},"pagetable_events_per_warm_iteration":{'; sep=""
  for k in $events; do printf '%s"%s":%s' "$sep" "$k" "${ev[$k]}"; sep=,; done
  printf '},"floor_terms":{'; sep=""
  for t in $terms; do
    IFS=: read -r e ca cb <<<"$t"
    printf '%s"%s":{"count":%s,"conservative":{"class":"%s","cycles":%s},"host_mechanisms":{"class":"%s","cycles":%s}}' \
      "$sep" "$e" "${ev[$e]}" "$ca" "${part[$e.a]}" "$cb" "${part[$e.b]}"; sep=,
  done
  printf '},"floor_cycles":{"conservative":%s,"host_mechanisms":%s},"pagetable_cycles":{' "$floor_a" "$floor_b"
  sep=""; for r in $rows; do printf '%s"%s":%s' "$sep" "$r" "${row[$r]}"; sep=,; done
  printf '},"over_floor":{'; sep=""
  for r in $rows; do
    printf '%s"%s":{"conservative":%s,"host_mechanisms":%s}' "$sep" "$r" "$(ratio "${row[$r]}" "$floor_a")" "$(ratio "${row[$r]}" "$floor_b")"; sep=,
  done
  printf '}}\n'
  exit 0
fi
printf 'pvm floor: the pagetable workload against the cost of this host'"'"'s traps (TSC %.3f GHz)\n' "$tsc_per_ns"
printf 'machine load average (1 min): %s at the start, %s at the end (2 cores, shared)\n\n' "$load_start" "$load_end"
printf 'One event in a native guest (bench/pvm_costs.S), TSC cycles: median of %s runs x %s samples, minus the empty window (%s)\n' "$runs" "$n" "$overhead"
desc() {
  case $1 in
    trap) echo 'int $0x1a (CPUID from the VMM: the cheapest trap)' ;;
    cr3) echo 'CR3 load, switching between two roots' ;;
    pf) echo '#PF delivered through the IDT, handler, iretq' ;;
    write) echo 'store into a shadowed leaf table the host synced' ;;
    write2) echo 'a second store into that table right after' ;;
    invlpg) echo 'invlpg of the replaced entry' ;;
    touch) echo 'first access through the replaced entry (re-fault)' ;;
    none) echo '-' ;;
    pf_guest) echo 'faults delivered (KVM pf_guest)' ;;
    invlpg-flushes) echo "invlpg flushes (runtime; KVM invlpg ${ev[invlpg]})" ;;
    cr3-loads) echo 'CR3 loads (runtime cr3-loads)' ;;
    unsync) echo 'write faults (kvmmmu:kvm_mmu_unsync_page)' ;;
    refault) echo "other host faults fixed (KVM pf_fixed ${ev[pf_fixed]} - write faults)" ;;
  esac
}
for c in $classes; do [ "$c" = rdtsc ] || printf '  %-7s %-52s %8s\n' "$c" "$(desc "$c")" "${cost[$c]}"; done
printf '  checks, KVM per sample of the cost guest: pf_guest %s (pf), invlpg %s, pf_fixed %s (write + touch), kvm_mmu_unsync_page %s (write)\n\n' \
  "$(per_sample "${check[pf_guest]}")" "$(per_sample "${check[invlpg]}")" "$(per_sample "${check[pf_fixed]}")" "$(per_sample "${check[unsync]}")"
printf 'Floors per warm pagetable iteration under pvm: events ((repeat=9 - repeat=1) / 8) x cycles each\n'
printf '  %-58s %7s %8s %9s %8s %9s\n' event count '(a) cost' '(a)' '(b) cost' '(b)'
for t in $terms; do
  IFS=: read -r e ca cb <<<"$t"
  printf '  %-58s %7s %8s %9s %8s %9s\n' "$(desc "$e")" "${ev[$e]}" "$ca" "${part[$e.a]}" "$cb" "${part[$e.b]}"
done
printf '  %-58s %7s %8s %9s %8s %9s\n' 'floor, cycles' '' '' "$floor_a" '' "$floor_b" 'floor, ms' '' '' "$(ms "$floor_a")" '' "$(ms "$floor_b")"
printf '  (same iterations: KVM pf_taken %s, insn_emulation %s, exits %s)\n\n' "${ev[pf_taken]}" "${ev[insn_emulation]}" "${ev[exits]}"
printf '  %-28s %10s %9s %11s %11s\n' 'pagetable, TIMING' cycles ms '/ floor (a)' '/ floor (b)'
for r in $rows; do
  printf '  %-28s %10s %9s %10sx %10sx\n' "$(echo "$r" | tr _ ' ')" "${row[$r]}" "$(ms "${row[$r]}")" "$(ratio "${row[$r]}" "$floor_a")" "$(ratio "${row[$r]}" "$floor_b")"
done

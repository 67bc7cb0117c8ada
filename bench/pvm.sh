#!/usr/bin/env bash
# KVM-PVM native mode vs the ordinary (emulated) path vs a host process vs QEMU TCG (issue 10;
# targets: compute within 1.2x of the host process, >= 1000x faster than the unmodified
# kernel emulated, faster than QEMU TCG on every workload).
#
#   bash bench/pvm.sh [N_NATIVE [N_EMULATED]] [--json]
#
# Part 1, the example kernel (examples/kernel), every workload alone (`workloads=W hz=100`)
# under four set-ups: the workload's time by the kernel's own TIMING line (TSC cycles, which
# KVM here and QEMU TCG take from the host's TSC unscaled; converted with the host's rate) and
# the VMM's exits for the whole run:
#   emulated  the unmodified kernel, `previrt run --backend pv` (ring 0: instruction-emulated),
#   hv        the pre-virtualized kernel (previrt toolchain + link), previrt.backend=hv, ordinary path,
#   pvm       the same image, previrt.backend=pvm under `previrt run --backend native`,
#   qemu      the unmodified kernel under QEMU TCG (examples/kernel/run-qemu.sh).
# hz=100 because the hv and emulated paths spend ~1 ms per tick (tests/runtime_hv.rs). Per
# workload, qemu/pvm is QEMU TCG's time over pvm's (> 1: pvm faster). The machine's load
# average (1 min) is printed at the start and the end: the machine is shared.
# Then `pagetable` repeated (repeat=8) under pvm and QEMU TCG: min and median ms per
# iteration (the first builds pvm's shadow copies and TCG's translations; single runs on
# this shared machine vary 2-3x).
# Then the compute loop's ns per iteration by the same TIMING line with compute=N (N_NATIVE for
# pvm and QEMU, N_EMULATED for emulated and hv; defaults 100,000,000 and 20,000) beside
# examples/kernel/compute-host (the same loop as a host process, N_NATIVE iterations).
#
# Part 2, one compute loop (bench/pvm_loop.S) in a hand-written guest, ns per iteration:
#   host      a plain process (bench/pvm_host.c), N_NATIVE iterations (default 200000000),
#   native    bench/pvm_guest.S under `previrt run --backend native`, N_NATIVE iterations,
#   emulated  the same guest under `--backend pv`, N_EMULATED iterations (default 2000).
# A guest's figure is (time in KVM_RUN for N) - (time in KVM_RUN for 0), over N: its own setup
# (page tables, IDT) is taken out. The machine is shared: compare figures from one run.
set -eu
cd "$(dirname "$0")/.."
. bench/pvm_common.sh
pvm_args "$@"
n_native=${args[0]:-200000000}
n_emu=${args[1]:-2000}
k_native=${args[0]:-100000000}
k_emu=${args[1]:-20000}
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-pvm.XXXXXX")
trap 'rm -rf "$work"' EXIT

pvm_build
pvm_guest "$work/guest" bench/pvm_loop.S
gcc -O2 -o "$work/host" bench/pvm_host.c "$work/pvm_loop.o"

# in_kvm_ns of one guest run: backend $1, iterations $2; checks the guest's mode line.
in_kvm() {
  local want=$([ "$1" = native ] && echo native || echo emulated)
  "$previrt" run "$work/guest" --backend "$1" --append "$2" --stats-json "$work/s.json" >"$work/out" 2>"$work/err" || true
  grep -q "^mode=$want result=" "$work/out" || { echo "bench/pvm: --backend $1 run failed:" >&2; cat "$work/out" "$work/err" >&2; exit 1; }
  sed -n 's/.*"in_kvm_ns": \([0-9]*\).*/\1/p' "$work/s.json"
}
per_iter() { # backend, iterations -> ns per iteration
  local t0 tn
  t0=$(in_kvm "$1" 0)
  tn=$(in_kvm "$1" "$2")
  echo "$tn $t0 $2" | awk '{ printf "%.3f", ($1 - $2) / $3 }'
}

# Part 1: the example kernel (built by pvm_build).
setups="emulated hv pvm qemu"
workloads="pagetable irqflag timer cpuid_msr mmio console compute"
load_start=$(cut -d' ' -f1 /proc/loadavg)
declare -A ms exits ratio
for w in $workloads; do
  for s in $setups; do
    exits[$s.$w]=$(krun "$s" "workloads=$w hz=100")
    ms[$s.$w]=$(echo "$(cycles "$w") $tsc_per_ns" | awk '{ printf "%.2f", $1 / $2 / 1e6 }')
  done
  ratio[$w]=$(echo "${ms[qemu.$w]} ${ms[pvm.$w]}" | awk '{ printf "%.2f", $1 / $2 }')
done
# pagetable repeated: "min median" ms per iteration of set-up $1.
pt_reps() {
  krun "$1" "workloads=pagetable repeat=8 hz=100" >/dev/null
  cycles pagetable | sort -n |
    awk -v t="$tsc_per_ns" '{ a[NR] = $1 } END { printf "%.2f %.2f", a[1] / t / 1e6, a[int((NR + 1) / 2)] / t / 1e6 }'
}
read -r pt_pvm_min pt_pvm_med <<<"$(pt_reps pvm)"
read -r pt_qemu_min pt_qemu_med <<<"$(pt_reps qemu)"
pt_ratio=$(echo "$pt_qemu_med $pt_pvm_med" | awk '{ printf "%.2f", $1 / $2 }')
# The compute loop, ns/iteration: the kernel's TIMING over N iterations (N_NATIVE for pvm and
# QEMU, N_EMULATED for the emulated paths); the host process times itself.
declare -A cns
for s in $setups; do
  n=$k_native; case $s in emulated|hv) n=$k_emu ;; esac
  krun "$s" "workloads=compute compute=$n hz=100" >/dev/null
  cns[$s]=$(echo "$(cycles compute) $tsc_per_ns $n" | awk '{ printf "%.3f", $1 / $2 / $3 }')
done
cns[host]=$("$work/plain/compute-host" "$k_native" | sed -n 's/^TIMING compute ns=//p' | awk -v n="$k_native" '{ printf "%.3f", $1 / n }')
k_pvm_vs_host=$(echo "${cns[pvm]} ${cns[host]}" | awk '{ printf "%.2f", $1 / $2 }')
k_emu_vs_pvm=$(echo "${cns[emulated]} ${cns[pvm]}" | awk '{ printf "%.0f", $1 / $2 }')
k_qemu_vs_pvm=$(echo "${cns[qemu]} ${cns[pvm]}" | awk '{ printf "%.2f", $1 / $2 }')

host=$("$work/host" "$n_native" | awk '{ print $2 }')
native=$(per_iter native "$n_native")
emu=$(per_iter pv "$n_emu")
native_vs_host=$(echo "$native $host" | awk '{ printf "%.2f", $1 / $2 }')
emu_vs_native=$(echo "$emu $native" | awk '{ printf "%.0f", $1 / $2 }')
load_end=$(cut -d' ' -f1 /proc/loadavg)
if [ "$json" = 1 ]; then
  printf '{"kernel":{"workloads":{'
  sep=""; for w in $workloads; do
    printf '%s"%s":{' "$sep" "$w"; sep2=""
    for s in $setups; do printf '%s"%s":{"ms":%s,"exits":%s}' "$sep2" "$s" "${ms[$s.$w]}" "${exits[$s.$w]:-0}"; sep2=,; done
    printf ',"qemu_vs_pvm":%s}' "${ratio[$w]}"; sep=,
  done
  printf '},"compute_iterations":{"host":%s,"pvm":%s,"qemu":%s,"hv":%s,"emulated":%s}' "$k_native" "$k_native" "$k_native" "$k_emu" "$k_emu"
  printf ',"compute_ns_per_iteration":{"host":%s,"pvm":%s,"hv":%s,"emulated":%s,"qemu":%s},"pvm_vs_host":%s,"emulated_vs_pvm":%s,"qemu_vs_pvm":%s},' \
    "${cns[host]}" "${cns[pvm]}" "${cns[hv]}" "${cns[emulated]}" "${cns[qemu]}" "$k_pvm_vs_host" "$k_emu_vs_pvm" "$k_qemu_vs_pvm"
  printf '"loop":{"iterations":{"host":%s,"native":%s,"emulated":%s},"ns_per_iteration":{"host":%s,"native":%s,"emulated":%s},"native_vs_host":%s,"emulated_vs_native":%s},' \
    "$n_native" "$n_native" "$n_emu" "$host" "$native" "$emu" "$native_vs_host" "$emu_vs_native"
  printf '"pagetable_repeat8_ms":{"pvm":{"min":%s,"median":%s},"qemu":{"min":%s,"median":%s},"qemu_vs_pvm_median":%s},' \
    "$pt_pvm_min" "$pt_pvm_med" "$pt_qemu_min" "$pt_qemu_med" "$pt_ratio"
  printf '"load":{"start":%s,"end":%s}}\n' "$load_start" "$load_end"
  exit 0
fi
printf 'Example kernel, one workload per run (workloads=W hz=100): ms by its own TIMING line (VMM exits of the whole run)\n'
printf 'machine load average (1 min): %s at the start, %s at the end (2 cores, shared)\n' "$load_start" "$load_end"
printf '%-10s' workload; for s in $setups; do printf ' %20s' "$s"; done; printf ' %10s\n' qemu/pvm
for w in $workloads; do
  printf '%-10s' "$w"
  for s in $setups; do
    if [ "$s" = qemu ]; then printf ' %20s' "${ms[$s.$w]}"; else printf ' %20s' "${ms[$s.$w]} (${exits[$s.$w]})"; fi
  done
  printf ' %9sx\n' "${ratio[$w]}"
done
printf '\npagetable, repeat=8, ms per iteration: pvm min %s median %s, qemu-tcg min %s median %s: qemu/pvm (medians) = %sx\n' \
  "$pt_pvm_min" "$pt_pvm_med" "$pt_qemu_min" "$pt_qemu_med" "$pt_ratio"
printf '\ncompute loop, ns/iteration: host %s  pvm %s  qemu-tcg %s  hv %s  emulated %s\n' \
  "${cns[host]}" "${cns[pvm]}" "${cns[qemu]}" "${cns[hv]}" "${cns[emulated]}"
printf 'pvm / host        = %sx   (target <= 1.2x)\n' "$k_pvm_vs_host"
printf 'emulated / pvm    = %sx   (target >= 1000x)\n' "$k_emu_vs_pvm"
printf 'qemu-tcg / pvm    = %sx   (target > 1x on every workload: see the table)\n\n' "$k_qemu_vs_pvm"
printf '%-40s %12s %14s\n' "compute loop (bench/pvm_loop.S)" iterations "ns/iteration"
printf '%-40s %12s %14s\n' "host process" "$n_native" "$host"
printf '%-40s %12s %14s\n' "previrt run --backend native (KVM-PVM)" "$n_native" "$native"
printf '%-40s %12s %14s\n' "previrt run --backend pv (emulated)" "$n_emu" "$emu"
printf 'native / host     = %sx   (target <= 1.2x)\n' "$native_vs_host"
printf 'emulated / native = %sx   (target >= 1000x)\n' "$emu_vs_native"

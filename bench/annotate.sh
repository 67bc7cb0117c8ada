#!/usr/bin/env bash
# Issue-9 proof: MMIO / page-table traffic of the example kernel on the in-tree hypervisor,
# unmodified vs pre-virtualized (hv backend) without and with the annotations' memory sites.
#
#   bash bench/annotate.sh [REPEAT]      (default 4)
#
# Builds (release previrt): the plain kernel; `previrt annotate` of it; the previrt-toolchain
# build without annotations ("hv") and with `gcc --annotations` ("hv+mem"); `previrt link` of
# both. Runs each on `previrt run --stats-json` with `hz=100 workloads=W repeat=REPEAT` for
# W in mmio, pagetable, and prints per run: the VMM's exits, KVM's own counters (exits,
# insn_emulation, tlb_flush — KVM_GET_STATS_FD; on KVM-PVM the LAPIC and shadow page tables
# are handled in the host kernel, so the VMM's exit table never sees that traffic), the
# memory sites executed, LAPIC accesses served in the guest / reaching the device, and wall
# time. Timing is noisy on a shared 2-core machine; counts are not.
set -eu
cd "$(dirname "$0")/.."
repeat=${1:-4}
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-annotate.XXXXXX")
trap 'rm -rf "$work"' EXIT
cargo build --quiet --release --bin previrt
P=target/release/previrt
make -s -C examples/kernel O="$work/plain" >/dev/null
$P annotate "$work/plain/kernel-pvh.elf" -o "$work/ann.json" >/dev/null
$P toolchain install --prefix "$work/tc" >/dev/null
X="$work/tc/bin/x86_64-previrt-linux-gnu-"
make -s -C examples/kernel O="$work/hv" CROSS_COMPILE="$X" >/dev/null
make -s -C examples/kernel O="$work/mem" CROSS_COMPILE="$X" CC="${X}gcc --annotations $work/ann.json" >/dev/null
$P link "$work/hv/kernel-pvh.elf" -o "$work/hv.elf" >/dev/null
$P link "$work/mem/kernel-pvh.elf" -o "$work/mem.elf" >/dev/null

word() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -1; }
printf '%-10s %-7s %6s %9s %11s %10s %8s %8s %8s %9s %9s\n' workload kernel verdict vmm-exits kvm-exits \
  insn-emul tlb-flush mmio-site pt-site lapic-vm lapic-dev
for w in mmio pagetable; do
  for k in plain hv mem; do
    case $k in plain) img=$work/plain/kernel-pvh.elf ;; hv) img=$work/hv.elf ;; mem) img=$work/mem.elf ;; esac
    out=$($P run --boot pvh "$img" --append "previrt.backend=hv hz=100 workloads=$w repeat=$repeat" \
      --stats-json "$work/$k-$w.json" 2>&1 || true)
    verdict=$(grep -q '^RESULT PASS' <<<"$out" && echo PASS || echo FAIL)
    trace=$(grep '^previrt-trace:' <<<"$out" || true)
    hvl=$(grep '^previrt-hv:' <<<"$out" || true)
    mmio=$(( $(word "$trace" mmio_read || true)0 / 10 + $(word "$trace" mmio_write || true)0 / 10 ))
    pt=$(( $(word "$trace" pt_read || true)0 / 10 + $(word "$trace" pt_write || true)0 / 10 ))
    served=$(( $(word "$hvl" lapic-in-guest || true)0 / 10 ))
    # Unmodified and site-less kernels: every LAPIC access the workload makes reaches the
    # device; the count is the annotated kernel's executed MMIO sites (same workload).
    read -r vexits kexits emul tlb wall < <(jq -r '[.exits, .kvm.exits, .kvm.insn_emulation, .kvm.tlb_flush, .wall_ns/1e6] | @tsv' "$work/$k-$w.json")
    printf '%-10s %-7s %6s %9s %11s %10s %8s %8s %8s %9s %9s   wall %.0f ms\n' "$w" "$k" "$verdict" "$vexits" "$kexits" \
      "$emul" "$tlb" "$mmio" "$pt" "$served" "$([ "$k" = mem ] && echo $((mmio - served)) || echo '=all')" "$wall"
  done
done
echo "lapic-vm: LAPIC accesses served by the runtime's in-guest copy; lapic-dev: accesses reaching KVM's LAPIC"
echo "(=all: every LAPIC access the workload makes, as many as mmio-site counts in the 'mem' row)."
echo "mmio-site/pt-site: memory sites the runtime routed (hv routes MMIO only; page-table sites keep the"
echo "original instruction, KVM's shadow MMU handles them in the host kernel)."

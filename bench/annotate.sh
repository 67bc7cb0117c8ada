#!/usr/bin/env bash
# Issue-9 proof: MMIO / page-table traffic of the example kernel on the in-tree hypervisor,
# unmodified vs pre-virtualized (hv backend) without and with the annotations' memory sites.
#
#   bash bench/annotate.sh [REPEAT]      (default 4)
#   bash bench/annotate.sh clear_page    native cost of sites in Linux's hottest zeroing loop
#   bash bench/annotate.sh linux [STEPS] Linux tinyconfig (DWARF build): recall/precision per
#                                        source against the traces (default window 6000000)
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
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-annotate.XXXXXX")
trap 'rm -rf "$work"' EXIT
cargo build --quiet --release --bin previrt
P=$PWD/target/release/previrt

# clear_page: Linux's clear_page_orig loop (arch/x86/lib/clear_page_64.S, the variant the
# hypervisor trace saw zero init_top_pgt) assembled by plain `as` and by previrt's `as` with its
# eight stores annotated pt_write, called on 4 KiB pages by a user-space harness. A site no
# runtime routes is the store plus NOP padding: this is its whole native cost. Best of 30
# alternating runs (the machine is shared).
clear_page() {
  $P toolchain install --prefix "$work/tc" >/dev/null
  {
    printf '\t.file 1 "arch/x86/lib/clear_page_64.S"\n\t.text\n\t.globl clear_page_orig\n'
    printf 'clear_page_orig:\n\txorl %%eax,%%eax\n\tmovl $64,%%ecx\n\t.p2align 4\n.Lloop:\n\tdecl %%ecx\n'
    for i in 0 1 2 3 4 5 6 7; do printf '\t.loc 1 %d\n\tmovq %%rax,%d(%%rdi)\n' $((32 + i)) $((8 * i)); done
    printf '\t.loc 1 40\n\tleaq 64(%%rdi),%%rdi\n\tjnz .Lloop\n\tnop\n\tret\n'
    printf '\t.section .note.GNU-stack,"",@progbits\n'
  } >"$work/clear_page.s"
  python3 -c 'import json; print(json.dumps({"format": "previrt-annotations/1", "accesses": [
    {"file": "arch/x86/lib/clear_page_64.S", "line": l, "kind": "pt_write"} for l in range(32, 40)]}))' >"$work/ann.json"
  printf '%s\n' '#include <stdio.h>' '#include <stdlib.h>' '#include <time.h>' \
    'void clear_page_orig(void *page);' \
    'static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }' \
    'int main(void) {' \
    '    char *buf = aligned_alloc(4096, 4096 * 16);' \
    '    double best = 1e18;' \
    '    for (int round = 0; round < 5; round++) {' \
    '        double t = now();' \
    '        for (long i = 0; i < 50000; i++) clear_page_orig(buf + 4096 * (i & 15));' \
    '        t = (now() - t) / 50000;' \
    '        best = t < best ? t : best;' \
    '    }' \
    '    printf("%.2f\n", best);' \
    '    return 0;' \
    '}' >"$work/harness.c"
  as -o "$work/plain.o" "$work/clear_page.s"
  PREVIRT_ANNOTATIONS="$work/ann.json" "$work/tc/bin/x86_64-previrt-linux-gnu-as" -o "$work/sites.o" "$work/clear_page.s"
  gcc -O2 -o "$work/plain" "$work/harness.c" "$work/plain.o"
  gcc -O2 -o "$work/sites" "$work/harness.c" "$work/sites.o"
  local sites
  sites=$($P toolchain report --json "$work/sites.o" | jq '[.[0].report.sites[]] | add')
  for _ in $(seq 1 30); do echo "p $("$work/plain")"; echo "s $("$work/sites")"; done >"$work/runs"
  best() { grep "^$1 " "$work/runs" | awk '{print $2}' | sort -n | head -1; }
  local p s
  p=$(best p) s=$(best s)
  echo "clear_page_orig, ns per 4 KiB page (best of 30): plain $p, with $sites memory sites $s," \
    "ratio $(echo "scale=3; $s / $p" | bc); site executions per page: $((sites * 64))"
}

# linux: the DWARF build of scripts/linux-build.sh --dwarf (cached), two traces of its boot
# under previrt run — a single-stepped window of STEPS instructions (every MMIO and page-table
# access; ~5 min for 6M, ~17 min for 16M) and the write-protect tracer over the whole boot
# (page-table stores only) — then previrt annotate's score per source against each.
linux() {
  local steps=${1:-6000000} vmlinux initrd
  read -r vmlinux initrd < <(bash scripts/linux-build.sh --dwarf | jq -r '"\(.vmlinux) \(.initrd)"')
  # reboot=t: after a panic Linux triple-faults, which stops the run (the profile is written then).
  local run=("$P" run "$vmlinux" --initrd "$initrd" --append 'console=ttyS0 panic=-1 reboot=t')
  local t0=$SECONDS
  "${run[@]}" --profile "$work/writes.json" --profile-writes >"$work/writes.log" 2>&1 || true
  # RIPs counted by python: jq holds numbers as doubles and would merge neighbouring RIPs.
  local rips
  rips=$(python3 -c 'import json, sys; print(len({a["rip"] for a in json.load(open(sys.argv[1]))["accesses"]}))' \
    "$work/writes.json")
  echo "write-protect tracer, whole boot: $((SECONDS - t0)) s, $(jq '.steps' "$work/writes.json") table stores" \
    "at $rips RIPs, $(jq '.pt_pages' "$work/writes.json") table pages; the run ended: $(tail -1 "$work/writes.log")"
  t0=$SECONDS
  "${run[@]}" --profile "$work/window.json" --profile-steps "$steps" >/dev/null 2>&1 || true
  echo "single-stepped window: $steps instructions, $((SECONDS - t0)) s"
  score() { # title, previrt annotate arguments…
    echo "== $1"
    $P annotate "$vmlinux" "${@:2}" | sed -n '/against the reference/,$p'
  }
  score "the window's trace as the profile source, scored against the window" --profile "$work/window.json"
  score "the window's trace as the profile source, scored against the whole boot's table stores" \
    --profile "$work/window.json" --reference "$work/writes.json"
  score "the whole boot's table stores as the profile source, scored against the window" \
    --profile "$work/writes.json" --reference "$work/window.json"
}

case "${1:-}" in
  clear_page) clear_page; exit 0 ;;
  linux) linux "${2:-}"; exit 0 ;;
esac
repeat=${1:-4}
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

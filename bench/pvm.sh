#!/usr/bin/env bash
# KVM-PVM native mode vs the ordinary (emulated) path vs a host process (issue 10; targets:
# native within 1.2x of the host process, >= 1000x faster than emulated).
#
#   bash bench/pvm.sh [N_NATIVE [N_EMULATED]] [--json]
#
# One compute loop (bench/pvm_loop.S) three ways, ns per iteration:
#   host      a plain process (bench/pvm_host.c), N_NATIVE iterations (default 200000000),
#   native    bench/pvm_guest.S under `previrt run --backend native`, N_NATIVE iterations,
#   emulated  the same guest under `--backend pv`, N_EMULATED iterations (default 2000).
# A guest's figure is (time in KVM_RUN for N) - (time in KVM_RUN for 0), over N: its own setup
# (page tables, IDT) is taken out. The machine is shared: compare figures from one run.
set -eu
cd "$(dirname "$0")/.."
json=0 args=()
for a in "$@"; do
  if [ "$a" = --json ]; then json=1; else args+=("$a"); fi
done
n_native=${args[0]:-200000000}
n_emu=${args[1]:-2000}
work=$(mktemp -d "${TMPDIR:-/tmp}/previrt-bench-pvm.XXXXXX")
trap 'rm -rf "$work"' EXIT

cargo build --quiet --release --bin previrt
previrt=target/release/previrt
as --64 -o "$work/guest.o" bench/pvm_guest.S
as --64 -o "$work/loop.o" bench/pvm_loop.S
ld -m elf_x86_64 -z max-page-size=4096 -Ttext=0x100000 -e _start -o "$work/guest" "$work/guest.o" "$work/loop.o"
gcc -O2 -o "$work/host" bench/pvm_host.c "$work/loop.o"

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

host=$("$work/host" "$n_native" | awk '{ print $2 }')
native=$(per_iter native "$n_native")
emu=$(per_iter pv "$n_emu")
native_vs_host=$(echo "$native $host" | awk '{ printf "%.2f", $1 / $2 }')
emu_vs_native=$(echo "$emu $native" | awk '{ printf "%.0f", $1 / $2 }')
if [ "$json" = 1 ]; then
  printf '{"iterations":{"host":%s,"native":%s,"emulated":%s},"ns_per_iteration":{"host":%s,"native":%s,"emulated":%s},"native_vs_host":%s,"emulated_vs_native":%s}\n' \
    "$n_native" "$n_native" "$n_emu" "$host" "$native" "$emu" "$native_vs_host" "$emu_vs_native"
  exit 0
fi
printf '%-40s %12s %14s\n' "compute loop (bench/pvm_loop.S)" iterations "ns/iteration"
printf '%-40s %12s %14s\n' "host process" "$n_native" "$host"
printf '%-40s %12s %14s\n' "previrt run --backend native (KVM-PVM)" "$n_native" "$native"
printf '%-40s %12s %14s\n' "previrt run --backend pv (emulated)" "$n_emu" "$emu"
printf 'native / host     = %sx   (target <= 1.2x)\n' "$native_vs_host"
printf 'emulated / native = %sx   (target >= 1000x)\n' "$emu_vs_native"

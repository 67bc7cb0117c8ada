#!/usr/bin/env bash
# Boot-time patching cost per site (target <= 100 ns/site).
#   bash bench/patch.sh [N]
# 1. The runtime's own patcher on a synthetic table of N (default 10000) sites in a host
#    process: first patch (native, trace) and re-patch, ns/site against the target.
# 2. The real figure from the guest: the example kernel built with the previrt toolchain,
#    `previrt link`ed, booted under QEMU TCG; its boot log line gives sites and microseconds
#    (TCG emulates the guest, so this is an upper bound, not the hardware cost).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}

cargo run -q --release -p previrt-link --example patch_bench -- "$n"

command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: run scripts/install-deps.sh" >&2; exit 1; }
cargo build -q --release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/previrt toolchain install --prefix "$work/tc" >/dev/null
make -s -C examples/kernel O="$work/k" CROSS_COMPILE="$work/tc/bin/x86_64-previrt-linux-gnu-"
./target/release/previrt link "$work/k/kernel-pvh.elf" -o "$work/linked.elf" >/dev/null
echo
echo "example kernel under QEMU TCG (boot log line):"
for backend in native trace; do
  line=$(TIMEOUT=60 examples/kernel/run-qemu.sh "$work/linked.elf" "previrt.backend=$backend" | grep -m1 '^previrt: backend=' || true)
  sites=$(sed -n 's/.* sites=\([0-9]*\) .*/\1/p' <<<"$line")
  us=$(sed -n 's/.* patched in \([0-9]*\) us.*/\1/p' <<<"$line")
  if [ -n "$sites" ] && [ -n "$us" ] && [ "$sites" -gt 0 ]; then
    echo "  $line   => $((us * 1000 / sites)) ns/site (TCG; includes CR0.WP toggle and serialization)"
  else
    echo "  $line"
  fi
done

#!/usr/bin/env bash
# Post-link patcher on Debian 6.1's vmlinux and all its modules (issue 8).
#   bash bench/postlink.sh [--no-objdump] [--boot]
# Patches vmlinux + every .ko with `previrt patch` on 2 cores (RAYON_NUM_THREADS=2), verifies
# every output with `previrt verify`, reports coverage (sites / (sensitive instructions + pv
# sites)), the trap fallbacks by reason, and times patch (wall and CPU) and verify against
# `objdump -d` over the same files in the same run (2 parallel objdumps). Target: patch <= 30 s,
# coverage >= 99.5 %.
# --boot also times QEMU TCG boots of Debian's vmlinux to a busybox initramfs that leaves
# through isa-debug-exit: unpatched, patched + `previrt link` with the native backend, and with
# the trace backend (whose summary line it prints), side by side.
set -euo pipefail
no_objdump=0 boot=0
for a in "$@"; do
    case $a in --no-objdump) no_objdump=1 ;; --boot) boot=1 ;; *) echo "unknown option $a" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2
cargo build -q --release --bin previrt
bin=$PWD/target/release/previrt
deb=$(bash scripts/debian-kernel.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# Wall time, and CPU time (user + sys) so a loaded machine can be told from a slow patcher.
TIMEFORMAT='%U %S'
t0=$(now)
{ time {
    "$bin" patch "$deb/vmlinux" -o "$work/vmlinux" --json >"$work/vmlinux.json"
    "$bin" patch "$deb/modules" -o "$work/modules" --json >"$work/modules.json"
}; } 2>"$work/cpu"
t1=$(now)
cpu=$(python3 -c "import sys; print(f'{sum(map(float, open(sys.argv[1]).read().split())):.2f}')" "$work/cpu")
set +e
"$bin" verify "$deb/vmlinux" "$work/vmlinux" >"$work/verify-vmlinux.txt"; v1=$?
"$bin" verify "$deb/modules" "$work/modules" >"$work/verify-modules.txt"; v2=$?
set -e
t2=$(now)
objdump_s=skipped
if [ "$no_objdump" = 0 ]; then
    t3=$(now)
    { echo "$deb/vmlinux"; find "$deb/modules" -name '*.ko'; } | xargs -P2 -n 64 objdump -d >/dev/null
    objdump_s=$(secs "$t3" "$(now)")
fi

python3 - "$work" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$objdump_s" "$v1" "$v2" "$cpu" <<'PY'
import json, sys, collections
work, patch_s, verify_s, objdump_s, v1, v2, cpu = sys.argv[1:]
runs = [json.load(open(f"{work}/{n}.json")) for n in ("vmlinux", "modules")]
tot = collections.Counter()
kinds = collections.defaultdict(collections.Counter)
reasons = collections.Counter()
for r in runs:
    s = r["summary"]
    for k in ("files", "refused", "sensitive", "pv_sites", "sites", "trampolines", "traps"):
        tot[k] += s[k]
    for k, c in s["by_kind"].items():
        kinds[k].update(c)
    for f in r["files"]:
        for fb in f["fallbacks"]:
            reasons[fb["reason"]] += 1
found = tot["sensitive"] + tot["pv_sites"]
print(f"files {tot['files']} (refused {tot['refused']}), sensitive {tot['sensitive']}, pv sites {tot['pv_sites']}")
print(f"sites {tot['sites']}: {tot['trampolines']} trampolines, {tot['traps']} trap fallbacks, "
      f"{tot['sites'] - tot['trampolines'] - tot['traps']} in place (pv)")
print(f"coverage {100.0 * min(tot['sites'], found) / max(found, 1):.2f} % (target >= 99.5 %); "
      f"moved into trampolines: {100.0 * tot['trampolines'] / max(tot['sensitive'], 1):.1f} % of sensitive instructions")
print("trap fallbacks by reason:")
for why, n in reasons.most_common():
    print(f"  {n:6}  {why}")
print("sites by kind (trampoline / trap / in place):")
for k in sorted(kinds):
    c = kinds[k]
    print(f"  {k:<10} {c['trampoline']:6} {c['trap']:6} {c['in_place']:6}")
print(f"verify: vmlinux {'PASS' if v1 == '0' else 'FAIL'}, modules {'PASS' if v2 == '0' else 'FAIL'}")
print(f"time (2 cores): patch {patch_s} s wall, {cpu} s CPU (target <= 30 s), verify {verify_s} s, ", end="")
if objdump_s == "skipped":
    print("objdump -d skipped")
else:
    print(f"objdump -d {objdump_s} s -> patch is {float(objdump_s) / float(patch_s):.1f}x faster than objdump alone (wall)")
PY
tail -1 "$work/verify-modules.txt"
grep -v '^PASS' "$work/verify-vmlinux.txt" || true

if [ "$boot" = 1 ]; then
    "$bin" link "$work/vmlinux" -o "$work/vmlinux.linked" >/dev/null
    mkdir -p "$work/root/bin" "$work/root/dev" "$work/root/proc"
    cp "$(command -v busybox)" "$work/root/bin/busybox"
    ln -sf busybox "$work/root/bin/sh"
    printf '#!/bin/sh\n/bin/busybox mknod /dev/port c 1 4\n/bin/busybox printf "\\001" | /bin/busybox dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n' >"$work/root/init"
    chmod +x "$work/root/init"
    (cd "$work/root" && find . | cpio -o -H newc --quiet >"$work/init.cpio")
    boot_s() {
        local t; t=$(now)
        timeout 300 qemu-system-x86_64 -machine q35,accel=tcg -cpu max -m 1024 -display none -vga none \
            -monitor none -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
            -kernel "$1" -initrd "$work/init.cpio" -append "console=ttyS0 loglevel=3 panic=-1 $2" >"$work/boot.log" 2>&1 || true
        secs "$t" "$(now)"
    }
    plain=$(boot_s "$deb/vmlinux" "")
    native=$(boot_s "$work/vmlinux.linked" "previrt.backend=native")
    trace=$(boot_s "$work/vmlinux.linked" "previrt.backend=trace")
    python3 -c "import sys; p, n, t = map(float, sys.argv[1:]); print(f'boot to init exit (QEMU TCG): unpatched {p:.1f} s, linked native {n:.1f} s ({n / p:.2f}x), linked trace {t:.1f} s ({t / p:.2f}x)')" "$plain" "$native" "$trace"
    grep -a '^previrt' "$work/boot.log" || true
fi
[ "$v1" = 0 ] && [ "$v2" = 0 ]

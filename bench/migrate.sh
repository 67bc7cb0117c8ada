#!/usr/bin/env bash
# Migration figures (issue 7): save + restore downtime of a 64 MiB guest (target <= 50 ms) and
# re-patch time (target <= 1 ms for 10,000 sites).
#   bash bench/migrate.sh [RUNS]
# 1. Downtime: the example kernel with --mem 64M is snapshotted mid-workload (after 1500
#    exits) and restored, RUNS times (default 5). Save = the VMM's "T ms to save" (complete
#    in-flight I/O, read state, write the file atomically with fsync); restore = "resuming
#    after T ms" (read + check the file, new VM, memory, device and vCPU state). Downtime is
#    their sum; the best and the median run are printed beside the target.
# 2. Re-patch: the runtime's own patcher (bench/patch.sh's host program) on a synthetic
#    table of the example kernel's size and of 10,000 sites; its "re-patch" row is the
#    trace -> native re-patch a migration performs.
# 3. Cooperative path: the pre-virtualized example kernel (previrt toolchain + link) on the
#    hv backend, 64 MiB, asked to suspend after 3000 ms, restored under --abi hv-v2 (it
#    re-detects and re-patches itself), RUNS times. Wait = request -> SUSPEND call; save and
#    restore as above; re-patch = the runtime's "re-patched in T us" inside the guest (ring 0
#    is instruction-emulated on this host: ~1.5 us per instruction). Downtime = save +
#    restore + in-guest re-patch.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
[ -r /dev/kvm ] || { echo "/dev/kvm missing: see scripts/install-deps.sh" >&2; exit 1; }
cargo build -q --release -p previrt
bin=./target/release/previrt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
make -s -C examples/kernel O="$work/k"
args='workloads=irqflag,console,compute repeat=4 console_lines=4'
$bin toolchain install --prefix "$work/tc" >/dev/null
make -s -C examples/kernel O="$work/pk" CROSS_COMPILE="$work/tc/bin/x86_64-previrt-linux-gnu-"
$bin link "$work/pk/kernel-pvh.elf" -o "$work/linked.elf" >/dev/null
hv_args='previrt.backend=hv hz=100 workloads=timer,console,compute repeat=4 console_lines=4 ticks=20'

saves=() restores=() sizes=()
for _ in $(seq "$runs"); do
  $bin run "$work/k/kernel.elf" --mem 64M --append "$args" --snapshot "$work/s.snap" \
    --snapshot-after 1500exits >/dev/null 2>"$work/save.err"
  $bin restore "$work/s.snap" >/dev/null 2>"$work/restore.err" || true
  saves+=("$(sed -n 's/.* \([0-9.]*\) ms to save.*/\1/p' "$work/save.err")")
  restores+=("$(sed -n 's/.*resuming after \([0-9.]*\) ms.*/\1/p' "$work/restore.err")")
  sizes+=("$(stat -c %s "$work/s.snap")")
done
python3 - "${saves[*]}" "${restores[*]}" "${sizes[*]}" <<'PY'
import statistics, sys
s = [float(x) for x in sys.argv[1].split()]
r = [float(x) for x in sys.argv[2].split()]
n = [int(x) for x in sys.argv[3].split()]
d = [a + b for a, b in zip(s, r)]
print(f"64 MiB guest (example kernel), {len(d)} runs, snapshot {statistics.median(n) / 1024:.0f} KiB (non-zero pages only)")
print(f"  {'':10} {'best ms':>9} {'median ms':>10} {'target ms':>10} {'median/target':>14}")
for name, v in (("save", s), ("restore", r), ("downtime", d)):
    print(f"  {name:10} {min(v):9.2f} {statistics.median(v):10.2f} {'50' if name == 'downtime' else '':>10} "
          + (f"{statistics.median(v) / 50:14.2f}" if name == "downtime" else ""))
PY

waits=() csaves=() crestores=() repatches=()
for _ in $(seq "$runs"); do
  $bin run --boot pvh "$work/linked.elf" --mem 64M --append "$hv_args" --snapshot "$work/c.snap" \
    --snapshot-after 3000ms >/dev/null 2>"$work/csave.err"
  $bin restore "$work/c.snap" --abi hv-v2 >"$work/crestore.out" 2>"$work/crestore.err" || true
  grep -q 'cooperative: guest suspended' "$work/csave.err" || { cat "$work/csave.err" >&2; exit 1; }
  waits+=("$(sed -n 's/.*guest suspended after \([0-9.]*\) ms.*/\1/p' "$work/csave.err")")
  csaves+=("$(sed -n 's/.* \([0-9.]*\) ms to save.*/\1/p' "$work/csave.err")")
  crestores+=("$(sed -n 's/.*resuming after \([0-9.]*\) ms.*/\1/p' "$work/crestore.err")")
  repatches+=("$(sed -n 's/^previrt: resumed on .* re-patched in \([0-9]*\) us.*/\1/p' "$work/crestore.out" | head -1)")
done
python3 - "${waits[*]}" "${csaves[*]}" "${crestores[*]}" "${repatches[*]}" <<'PY'
import statistics, sys
w, s, r = ([float(x) for x in a.split()] for a in sys.argv[1:4])
p = [float(x) / 1000 for x in sys.argv[4].split()]
d = [a + b + c for a, b, c in zip(s, r, p)]
print(f"\ncooperative path: pre-virtualized example kernel on hv, 64 MiB, v1 -> v2, {len(d)} runs")
print(f"  {'':22} {'best ms':>9} {'median ms':>10} {'target ms':>10}")
for name, v, t in (("suspend wait", w, ""), ("save", s, ""), ("restore", r, ""),
                   ("in-guest re-patch", p, ""), ("downtime", d, "50")):
    print(f"  {name:22} {min(v):9.2f} {statistics.median(v):10.2f} {t:>10}")
PY
echo
echo "re-patch (host process, the guest runtime's patcher):"
for n in 104 10000; do
  echo "  $n sites:"
  cargo run -q --release -p previrt-link --example patch_bench -- "$n" | sed 's/^/    /'
done

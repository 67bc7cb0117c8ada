#!/usr/bin/env bash
# Build Linux 6.1 (tinyconfig + a serial console, PVH) twice in one run — with the plain gcc
# toolchain and with previrt's CROSS_COMPILE toolchain — then boot both vmlinux files under
# QEMU TCG with a busybox initramfs and compare what init prints.
#
# usage: scripts/linux-build.sh [--force] [--json] [--dwarf]
#
# --dwarf: instead, the same configuration plus CONFIG_DEBUG_INFO_DWARF5, plain gcc only, in
# $CACHE/dwarf (previrt annotate's DWARF source and `previrt run --profile` read it); built
# only when missing (or --force), its own cache: the main report's stamp is not involved.
# Prints {"vmlinux", "initrd", "seconds"} (JSON) and nothing else on stdout.
#
# Cache: ~/.cache/previrt/linux (PREVIRT_LINUX_CACHE overrides). The result is
# report.json there plus a text summary on stdout. When report.json exists and was made from
# the same toolchain sources (stamp), nothing is rebuilt; --force rebuilds anyway.
# The previrt binary is target/release/previrt (PREVIRT_BIN overrides; built if missing).
set -euo pipefail

# Everything runs inside main(): bash parses the whole file first, so editing this script
# while a build runs cannot change the running one.
main() {
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${PREVIRT_LINUX_CACHE:-$HOME/.cache/previrt/linux}
TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC=$CACHE/src
REPORT=$CACHE/report.json
JOBS=${PREVIRT_LINUX_JOBS:-2}
FORCE=0
JSON=0
DWARF=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --json) JSON=1 ;;
    --dwarf) DWARF=1 ;;
    *) echo "linux-build: unknown argument $a (usage: $0 [--force] [--json] [--dwarf])" >&2; exit 2 ;;
  esac
done

die() { echo "linux-build: $*" >&2; exit 1; }
log() { [ "$JSON" = 1 ] || echo "linux-build: $*" >&2; }

for tool in make gcc flex bison bc cpio python3 qemu-system-x86_64 xz; do
  command -v "$tool" >/dev/null || die "missing $tool: run scripts/install-deps.sh"
done
[ -f "$TARBALL" ] || die "missing $TARBALL: run scripts/install-deps.sh"
BUSYBOX=$(command -v busybox || true)
{ [ -n "$BUSYBOX" ] && file -L "$BUSYBOX" | grep -q 'statically linked'; } ||
  die "missing a static busybox (busybox-static): run scripts/install-deps.sh"

# What the result depends on besides the kernel source: the toolchain's code, and the report
# format (REPORT_VERSION: bump it when the report or the build recipe changes).
REPORT_VERSION=2
stamp() {
  { echo "$REPORT_VERSION"; cat "$ROOT"/cross-compile-wrapper/src/*.rs "$ROOT"/rewriter/src/catalogue.rs \
    "$ROOT"/rewriter/src/record.rs; } | sha256sum | cut -c1-16
}
STAMP=$(stamp)

summary() {
  python3 - "$REPORT" "$JSON" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if sys.argv[2] == "1":
    print(json.dumps(r, indent=2)); sys.exit(0)
p, v, c = r["builds"]["plain"], r["builds"]["previrt"], r["coverage"]
print(f"build plain   {p['seconds']:8.1f} s wall {p['cpu_seconds']:8.1f} s cpu   vmlinux {p['vmlinux_bytes']} bytes")
print(f"build previrt {v['seconds']:8.1f} s wall {v['cpu_seconds']:8.1f} s cpu   vmlinux {v['vmlinux_bytes']} bytes")
print(f"ratio         {r['build_ratio']:.3f} wall, {r['build_cpu_ratio']:.3f} cpu  (target <= 1.03)")
print(f"sites         {r['sites']['total']}  " + ", ".join(f"{k} {n}" for k, n in r['sites']['by_kind'].items()))
print(f"padding       {r['sites']['padding_bytes']} bytes = {r['sites']['padding_pct_of_text']:.4f}% of .text ({r['text_bytes']} bytes)  (target <= 0.3%)")
print(f"coverage      {c['covered']}/{c['found_64bit']} sensitive instructions in 64-bit code = {c['pct_64bit']:.2f}%")
for u in c["not_covered"]:
    print(f"  not covered {u['kind']:10} {u['section']}+{u['offset']:#x} {u.get('function') or ''}: {u['reason']} ({u['detail']})")
for e in c["embedded_as_data"]:
    print(f"  embedded as data: {e['what']}: {e['found']} sensitive instructions ({e['reason']})")
b = r["boot"]
for name, w in r["objtool_warnings"].items():
    print(f"objtool       {name}: {len(w)} warnings" + "".join(f"\n  {l}" for l in w[:10]))
print(f"boot          plain {b['plain']['init_output']!r} / previrt {b['previrt']['init_output']!r}: " + ("identical" if b["identical"] else "DIFFERENT"))
EOF
}

# One run at a time per cache (a test run and a manual run must not share a build tree). The
# --dwarf tree has its own lock, so its long build does not hold up the main one; it takes the
# main lock only while the source may be extracted.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

if [ "$DWARF" = 0 ] && [ "$FORCE" = 0 ] && [ -f "$REPORT" ] && [ -f "$CACHE/plain/vmlinux" ] && [ -f "$CACHE/previrt/vmlinux" ] &&
   python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1])).get("stamp") != sys.argv[2])' "$REPORT" "$STAMP"; then
  log "cached result in $REPORT (use --force to rebuild)"
  summary
  exit 0
fi

mkdir -p "$CACHE"
if [ ! -f "$SRC/Makefile" ]; then
  log "extracting $TARBALL"
  rm -rf "$CACHE/src.tmp"
  mkdir -p "$CACHE/src.tmp"
  tar xJf "$TARBALL" -C "$CACHE/src.tmp" --strip-components=1
  mv "$CACHE/src.tmp" "$SRC"
fi
if [ "$DWARF" = 1 ]; then
  exec 9>"$CACHE/.lock-dwarf"
  flock 9
fi

CONFIG_EXTRA= # more scripts/config options (the --dwarf build's)
configure() { # OUT [make args…]
  local out=$1; shift
  rm -rf "$out"; mkdir -p "$out"
  make -C "$SRC" O="$out" "$@" -s tinyconfig >/dev/null
  "$SRC/scripts/config" --file "$out/.config" -e 64BIT -e PRINTK -e TTY -e SERIAL_8250 \
    -e SERIAL_8250_CONSOLE -e BINFMT_ELF -e BLK_DEV_INITRD -e HYPERVISOR_GUEST -e PVH \
    -d PARAVIRT -d KVM_GUEST -d XEN $CONFIG_EXTRA
  make -C "$SRC" O="$out" "$@" -s olddefconfig >/dev/null
}

# A tiny initramfs: busybox as init, /etc/inittab prints one line and powers off.
INITRD=$CACHE/initramfs.cpio
initramfs() {
  rm -rf "$CACHE/initramfs"
  mkdir -p "$CACHE/initramfs"/{bin,dev,etc,proc}
  cp "$BUSYBOX" "$CACHE/initramfs/bin/busybox"
  ln -s bin/busybox "$CACHE/initramfs/init"
  mknod -m 600 "$CACHE/initramfs/dev/console" c 5 1
  printf '::sysinit:/bin/busybox echo previrt-init: hello\n::sysinit:/bin/busybox poweroff -f\n' \
    >"$CACHE/initramfs/etc/inittab"
  (cd "$CACHE/initramfs" && find . | cpio -o -H newc --quiet >"$INITRD.tmp") && mv "$INITRD.tmp" "$INITRD"
}

build() { # NAME [make args…]; wall, user and system seconds go to $CACHE/NAME/time
  local name=$1; shift
  local out=$CACHE/$name
  configure "$out" "$@"
  log "building $name vmlinux (-j$JOBS)"
  # CPU time (user+sys of make and every child) is the fair comparison on a shared machine.
  local TIMEFORMAT='%R %U %S'
  { time make -C "$SRC" O="$out" "$@" -j"$JOBS" -s vmlinux >"$out/build.log" 2>&1; } 2>"$out/time" ||
    { tail -30 "$out/build.log" >&2; die "$name build failed (log: $out/build.log)"; }
}

if [ "$DWARF" = 1 ]; then
  # `done` is written last: an interrupted build is rebuilt, not reused.
  if [ "$FORCE" = 1 ] || [ ! -f "$CACHE/dwarf/done" ]; then
    CONFIG_EXTRA="-e DEBUG_KERNEL -d DEBUG_INFO_NONE -e DEBUG_INFO_DWARF5"
    build dwarf
    grep -q '^CONFIG_DEBUG_INFO_DWARF5=y' "$CACHE/dwarf/.config" || die "DWARF 5 not enabled in $CACHE/dwarf/.config"
    cut -d' ' -f1 "$CACHE/dwarf/time" >"$CACHE/dwarf/done"
  fi
  [ -f "$INITRD" ] || initramfs
  printf '{"vmlinux": "%s", "initrd": "%s", "seconds": %s}\n' "$CACHE/dwarf/vmlinux" "$INITRD" "$(cat "$CACHE/dwarf/done")"
  exit 0
fi

PREVIRT=${PREVIRT_BIN:-$ROOT/target/release/previrt}
if [ -z "${PREVIRT_BIN:-}" ]; then
  log "building $PREVIRT"
  (cd "$ROOT" && cargo build --release --quiet --bin previrt)
fi
[ -x "$PREVIRT" ] || die "no previrt binary at $PREVIRT"
# A private copy: rebuilding previrt during the build must not change the toolchain.
"$PREVIRT" toolchain install --prefix "$CACHE/toolchain" --copy >/dev/null
CROSS=$CACHE/toolchain/bin/x86_64-previrt-linux-gnu-

build plain
rm -f "$CACHE/as-log.jsonl"
PREVIRT_LOG="$CACHE/as-log.jsonl" build previrt CROSS_COMPILE="$CROSS"

initramfs

boot() { # NAME; the serial log goes to $CACHE/NAME/boot.log
  local out=$CACHE/$1 pid i
  rm -f "$out/boot.log"
  qemu-system-x86_64 -machine pc,accel=tcg -cpu max -m 256 -smp 1 -display none -vga none \
    -monitor none -serial "file:$out/boot.log" -no-reboot -kernel "$out/vmlinux" \
    -initrd "$INITRD" -append 'console=ttyS0 panic=-1' &
  pid=$!
  for i in $(seq 1 600); do
    grep -qE 'reboot: (Power down|System halted)|Kernel panic|Attempted to kill init' "$out/boot.log" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
log "booting both kernels under QEMU TCG"
boot plain
boot previrt

log "reporting"
"$PREVIRT" toolchain report --json "$CACHE/previrt/vmlinux" >"$CACHE/previrt/sites.json"
VDSO=$CACHE/previrt/arch/x86/entry/vdso/vdso64.so.dbg
if [ -f "$VDSO" ]; then
  "$PREVIRT" toolchain report --json "$VDSO" >"$CACHE/previrt/vdso-sites.json"
else
  echo '[]' >"$CACHE/previrt/vdso-sites.json"
fi

python3 - "$CACHE" "$STAMP" <<'EOF'
import json, os, sys
cache, stamp = sys.argv[1], sys.argv[2]

def times(name):
    real, user, system = (float(x) for x in open(f"{cache}/{name}/time").read().split())
    return {"seconds": real, "cpu_seconds": round(user + system, 2),
            "vmlinux_bytes": os.path.getsize(f"{cache}/{name}/vmlinux")}
rep = json.load(open(f"{cache}/previrt/sites.json"))[0]["report"]
vdso = json.load(open(f"{cache}/previrt/vdso-sites.json"))
objs = [json.loads(l) for l in open(f"{cache}/as-log.jsonl")]

def init_output(name):
    try:
        log = open(f"{cache}/{name}/boot.log", errors="replace").read()
    except FileNotFoundError:
        log = ""
    lines = [l.rstrip("\r") for l in log.splitlines() if l.startswith("previrt-init:")]
    return {"init_output": "\n".join(lines), "stopped": any(m in log for m in ("reboot: Power down", "reboot: System halted")),
            "log": f"{cache}/{name}/boot.log"}

# Everything the text side left alone as 16/32-bit code, by object (PVH head.S, realmode).
narrow = {}
for o in objs:
    for n in (o.get("text") or {}).get("narrow_code", []):
        narrow.setdefault(o.get("object") or "-", []).append(n)
embedded = [{"what": obj, "found": len(ns), "reason": "16/32-bit code, not rewritten",
             "at": [n["at"] for n in ns][:20]} for obj, ns in sorted(narrow.items())]
for v in vdso:
    embedded.append({"what": v["path"], "found": v["report"]["found"],
                     "reason": "vDSO: user code embedded as data in vmlinux, its own "
                               f"{sum(v['report']['sites'].values())} sites are inert"})

found_64 = rep["found"]
r = {
    "stamp": stamp,
    "builds": {"plain": times("plain"), "previrt": times("previrt")},
    "text_bytes": rep["text_bytes"],
    "code_bytes": rep["code_bytes"],
    "sites": {
        "total": sum(rep["sites"].values()),
        "by_kind": rep["sites"],
        "padding_bytes": rep["padding_bytes"],
        "padding_pct_of_text": 100.0 * rep["padding_bytes"] / max(rep["text_bytes"], 1),
        "padding_pct_of_code": 100.0 * rep["padding_bytes"] / max(rep["code_bytes"], 1),
        "mismatches": rep["mismatches"],
    },
    "coverage": {
        "found_64bit": found_64,
        "covered": rep["covered"],
        "pct_64bit": 100.0 * rep["covered"] / max(found_64, 1),
        "not_covered": rep["uncovered"],
        "embedded_as_data": embedded,
    },
    "objects": {
        "assembled": len(objs),
        "with_sites": sum(1 for o in objs if (o.get("object_report") or {}).get("sites")),
        "rewrite_rejected": [{"object": o["object"], "error": o["rewrite_rejected"]}
                             for o in objs if o.get("rewrite_rejected")],
        "passthrough": [{"object": o["object"], "why": o["passthrough"]} for o in objs if o.get("passthrough")],
        "errors": [{"object": o["object"], "error": o["error"]} for o in objs if o.get("error")],
        "uncovered": [{"object": o["object"], **u} for o in objs
                      for u in (o.get("object_report") or {}).get("uncovered", [])],
    },
    "boot": {"plain": init_output("plain"), "previrt": init_output("previrt")},
    # kbuild runs objtool after `as`: its complaints land in the quiet build log.
    "objtool_warnings": {b: [l.strip() for l in open(f"{cache}/{b}/build.log", errors="replace")
                             if "objtool" in l] for b in ("plain", "previrt")},
}
bp, bv = r["builds"]["plain"], r["builds"]["previrt"]
r["build_ratio"] = bv["seconds"] / bp["seconds"]
r["build_cpu_ratio"] = bv["cpu_seconds"] / bp["cpu_seconds"]
b = r["boot"]
b["identical"] = bool(b["plain"]["init_output"]) and b["plain"]["init_output"] == b["previrt"]["init_output"]
tmp = f"{cache}/report.json.tmp"
json.dump(r, open(tmp, "w"), indent=2)
os.replace(tmp, f"{cache}/report.json")
EOF
summary
}

main "$@"

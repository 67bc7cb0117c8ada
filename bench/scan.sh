#!/usr/bin/env bash
# Benchmark `previrt scan` against `objdump -d` on one large real ELF, in the same run.
#
#   bench/scan.sh [ELF]
#
# Without an argument it scans Debian's vmlinux when scripts/debian-kernel.sh has cached it
# (~/.cache/previrt/debian/vmlinux), else the largest x86-64 ELF under /usr/lib, /boot and
# /usr/bin. Prints executable MB, MB/s of both tools (wall and per core), the speed ratio, and
# the per-kind counts of both side by side. Targets: >= 20x objdump, >= 100 MB/s per core.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bin previrt
PREVIRT=${PREVIRT:-$PWD/target/release/previrt}
command -v objdump >/dev/null || { echo "bench/scan.sh: objdump missing: run scripts/install-deps.sh" >&2; exit 1; }

target=${1:-}
if [ -z "$target" ]; then
  if [ -f "$HOME/.cache/previrt/debian/vmlinux" ]; then
    target=$HOME/.cache/previrt/debian/vmlinux
  else
    # Largest file with the ELF magic that previrt accepts (x86-64).
    while read -r _ f; do
      if [ "$(head -c4 "$f" 2>/dev/null | od -An -c | tr -d ' ')" = "177ELF" ] && "$PREVIRT" scan "$f" >/dev/null 2>&1; then
        target=$f; break
      fi
    done < <(find /usr/lib /boot /usr/bin -xdev -type f -size +1M -printf '%s %p\n' 2>/dev/null | sort -rn | head -200)
  fi
fi
[ -n "$target" ] || { echo "bench/scan.sh: no x86-64 ELF found" >&2; exit 1; }

exec python3 bench/scan_compare.py "$PREVIRT" "$target"

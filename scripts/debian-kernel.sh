#!/usr/bin/env bash
# Fetches Debian's distro kernel (linux-image-6.1.0-*-amd64) once and extracts what the
# post-link patcher and the scan benchmark work on:
#   ~/.cache/previrt/debian/vmlinux       the ELF inside vmlinuz (stripped, PVH note)
#   ~/.cache/previrt/debian/modules/      every .ko, uncompressed
#   ~/.cache/previrt/debian/VERSION       the package version
# Idempotent: does nothing when the cache is complete. Prints the cache directory.
set -euo pipefail

cache="${PREVIRT_CACHE:-$HOME/.cache/previrt}/debian"
# Tests call this concurrently: one fetches, the others wait and then find the cache complete.
mkdir -p "$(dirname "$cache")"
exec 9>"$cache.lock"
flock 9
if [ -s "$cache/vmlinux" ] && [ -s "$cache/VERSION" ] && [ -d "$cache/modules" ]; then
  echo "$cache"
  exit 0
fi
command -v apt-get >/dev/null || { echo "debian-kernel: apt-get not found" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Newest signed 6.1 image the mirror has.
pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
fi
[ -n "$pkg" ] || { echo "debian-kernel: no linux-image-6.1.0-*-amd64 package found (run apt-get update)" >&2; exit 1; }
(cd "$work" && apt-get download -qq "$pkg")
dpkg -x "$work"/*.deb "$work/root"

vmlinuz=$(ls "$work"/root/boot/vmlinuz-*)
# bzImage header: setup_sects at 0x1f1, payload_offset (u32) at 0x248 and payload_length at
# 0x24c, both relative to the protected-mode code that starts at (setup_sects+1)*512.
u8() { od -An -tu1 -j "$1" -N1 "$vmlinuz" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$vmlinuz" | tr -d ' '; }
setup_sects=$(u8 $((0x1f1)))
[ "$setup_sects" -eq 0 ] && setup_sects=4
pm=$(( (setup_sects + 1) * 512 ))
off=$(( pm + $(u32 $((0x248))) ))
len=$(u32 $((0x24c)))
mkdir -p "$cache.tmp"
tail -c +$((off + 1)) "$vmlinuz" | head -c "$len" | xz -dc >"$cache.tmp/vmlinux" 2>/dev/null || true
head -c 4 "$cache.tmp/vmlinux" | grep -q 'ELF' || { echo "debian-kernel: could not extract an ELF from $vmlinuz" >&2; exit 1; }

mkdir -p "$cache.tmp/modules"
find "$work/root/lib/modules" -name '*.ko' -print0 | while IFS= read -r -d '' ko; do
  rel=${ko#"$work"/root/lib/modules/*/kernel/}
  mkdir -p "$cache.tmp/modules/$(dirname "$rel")"
  mv "$ko" "$cache.tmp/modules/$rel"
done
find "$work/root/lib/modules" -name '*.ko.xz' -print0 | while IFS= read -r -d '' ko; do
  rel=${ko#"$work"/root/lib/modules/*/kernel/}
  mkdir -p "$cache.tmp/modules/$(dirname "$rel")"
  xz -dc "$ko" >"$cache.tmp/modules/${rel%.xz}"
done
dpkg-deb -f "$work"/*.deb Package Version | tr '\n' ' ' >"$cache.tmp/VERSION"
rm -rf "$cache"
mv "$cache.tmp" "$cache"
echo "$cache"

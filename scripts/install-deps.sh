#!/usr/bin/env bash
# Installs everything the test suite and benchmarks need, idempotently.
# Safe to run again: it only installs what is missing.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: must run as root (apt-get); run: sudo $0" >&2
    exit 1
  fi
}

# QEMU 10 comes from bookworm-backports; reuse the mirror URI the machine already uses.
ensure_backports() {
  local src=/etc/apt/sources.list.d/debian.sources
  local bp=/etc/apt/sources.list.d/previrt-backports.sources
  [ -f "$bp" ] && return 0
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' "$src")
  [ -n "$uri" ] || { echo "install-deps: no URIs: line in $src" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" >"$bp"
  APT_UPDATED=
}

APT_UPDATED=
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$APT_UPDATED" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# A /dev/null that became a regular file (some tool, run as root, renamed its output over it)
# keeps what is written to it and feeds it back to every reader: cargo's `rustc -` probes then
# compile other processes' error messages. Put the device back.
ensure_dev_null() {
  [ -c /dev/null ] && return 0
  echo "install-deps: /dev/null was a regular file; recreating the device node" >&2
  rm -f /dev/null
  mknod -m 666 /dev/null c 1 3
}

main() {
  need_root
  ensure_dev_null
  ensure_backports
  # Toolchain pieces for the example kernel, the Linux build and its initramfs.
  apt_install build-essential binutils flex bison bc libelf-dev libssl-dev dwarves cpio kmod \
    xz-utils busybox-static python3 file
  # QEMU 10 (TCG "bare metal") from backports.
  if ! dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | grep -q bpo; then
    if [ -z "$APT_UPDATED" ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-x86
  fi
  # Real Xen 4.17 and Linux 6.1 sources.
  apt_install xen-hypervisor-4.17-amd64 linux-source-6.1
  # The Rust test runner the suite uses.
  command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
}

main "$@"

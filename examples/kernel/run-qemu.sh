#!/usr/bin/env bash
# Boots a kernel under QEMU TCG with the serial console on stdout and turns the kernel's
# isa-debug-exit verdict back into an ordinary exit status.
#
#   run-qemu.sh KERNEL [CMDLINE]
#
# Exit status: 0 = the kernel reported PASS, 1 = FAIL, 2 = bad usage or QEMU missing,
# 3 = QEMU stopped without a verdict (e.g. a triple fault), 124 = timed out.
# Environment: QEMU (default qemu-system-x86_64), TIMEOUT in seconds (default 120),
# QEMU_EXTRA_ARGS (extra arguments, word-split).
set -u

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 KERNEL [CMDLINE]" >&2
  exit 2
fi
kernel=$1
cmdline=${2-}
qemu=${QEMU:-qemu-system-x86_64}
timeout_s=${TIMEOUT:-120}

if [ ! -r "$kernel" ]; then
  echo "run-qemu: cannot read kernel '$kernel'" >&2
  exit 2
fi
if ! command -v "$qemu" >/dev/null 2>&1; then
  echo "run-qemu: '$qemu' not found; run scripts/install-deps.sh" >&2
  exit 2
fi

# shellcheck disable=SC2086 # QEMU_EXTRA_ARGS is a word list on purpose
timeout --foreground -k 5 "$timeout_s" "$qemu" -machine q35,accel=tcg -cpu max -m 128 \
  -display none -vga none -monitor none -serial stdio -no-reboot \
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
  -kernel "$kernel" -append "$cmdline" ${QEMU_EXTRA_ARGS-} </dev/null
status=$?

# isa-debug-exit: the kernel writes 0 (PASS) or 1 (FAIL); QEMU exits with (v << 1) | 1.
case $status in
  1) exit 0 ;;
  3) exit 1 ;;
  124) echo "run-qemu: no verdict within ${timeout_s}s" >&2; exit 124 ;;
  *) echo "run-qemu: QEMU exited with status $status without a verdict" >&2; exit 3 ;;
esac

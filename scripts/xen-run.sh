#!/usr/bin/env bash
# Boots a Xen PV kernel (e.g. the pre-virtualized example kernel after `previrt link`) as dom0
# of Debian's Xen 4.17 under QEMU TCG, with Xen's and the guest's console on stdout, and turns
# the guest's isa-debug-exit verdict into an exit status.
#
#   scripts/xen-run.sh KERNEL [CMDLINE]
#
# Exit status: 0 = PASS, 1 = FAIL, 2 = bad usage or QEMU/Xen missing, 3 = dom0 stopped or
# crashed without a verdict (the line before Xen's says why), 124 = timed out.
# Prints "xen-run: verdict after N ms" (QEMU start to QEMU exit) on stderr.
# Environment: QEMU (default qemu-system-x86_64), XEN_GZ (default /boot/xen-4.17-amd64.gz),
# TIMEOUT in seconds (default 60), DOM0_MEM (default 16M), MEM (the machine's MiB, default 64),
# DOM0_INITRD (a second module for dom0, e.g. Linux's initramfs: scripts/xen-domu.sh).
set -u

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 KERNEL [CMDLINE]" >&2
  exit 2
fi
kernel=$1
cmdline=${2-}
qemu=${QEMU:-qemu-system-x86_64}
xen_gz=${XEN_GZ:-/boot/xen-4.17-amd64.gz}
timeout_s=${TIMEOUT:-60}

if [ ! -r "$kernel" ]; then
  echo "xen-run: cannot read kernel '$kernel'" >&2
  exit 2
fi
for path in "$kernel" ${DOM0_INITRD:+"$DOM0_INITRD"}; do
  case $path in *,* | *' '*)
    echo "xen-run: '$path': module paths must not contain ',' or spaces (QEMU's -initrd list)" >&2
    exit 2 ;;
  esac
done
initrd=${DOM0_INITRD:+,$DOM0_INITRD}
if ! command -v "$qemu" >/dev/null 2>&1; then
  echo "xen-run: '$qemu' not found; run scripts/install-deps.sh" >&2
  exit 2
fi
if [ ! -r "$xen_gz" ]; then
  echo "xen-run: Xen hypervisor '$xen_gz' not found; run scripts/install-deps.sh (xen-hypervisor-4.17-amd64)" >&2
  exit 2
fi

# QEMU's -kernel wants the uncompressed multiboot ELF: cache it per user, refreshed when the
# package's file changes.
cache=${XDG_CACHE_HOME:-$HOME/.cache}/previrt
xen_bin=$cache/$(basename "$xen_gz" .gz).bin
if [ ! -s "$xen_bin" ] || [ "$xen_gz" -nt "$xen_bin" ]; then
  mkdir -p "$cache" && gunzip -c "$xen_gz" >"$xen_bin.tmp.$$" && mv "$xen_bin.tmp.$$" "$xen_bin" || {
    echo "xen-run: cannot unpack $xen_gz into $cache" >&2
    exit 2
  }
fi

fifo=$(mktemp -u "${TMPDIR:-/tmp}/xen-run.XXXXXX")
mkfifo "$fifo" || exit 2
trap 'rm -f "$fifo"' EXIT

start=$(date +%s%N)
# Boot-time choices (measured in docs/xen-pv.md, "Measurements"): the i440FX machine (SeaBIOS
# reaches the multiboot loader ~200 ms sooner than on q35), no default devices (no NIC option
# ROM to load), no SVM/VMX (Xen skips HVM set-up), a small machine, and the
# RTC on the VM clock so its first second boundary — which Xen's wall-clock read waits for —
# counts from VM start, not from QEMU's start-up. Xen: no scrubbing, no cpufreq, one CPU, and
# its default log level (loglvl=all doubles its boot log, which the serial port is still
# draining when dom0 starts: dom0's first lines came 50-70 ms later).
# Dom0's command line is the module string after the file name; QEMU splits -initrd at
# commas, ",," is a literal one.
timeout -k 5 "$timeout_s" "$qemu" -machine pc,accel=tcg -nodefaults -cpu max,-svm,-vmx -m "${MEM:-64}" \
  -rtc clock=vm -smp 1 -display none -monitor none -serial stdio -no-reboot \
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel "$xen_bin" \
  -append "console=com1 com1=115200,8n1 dom0_mem=${DOM0_MEM:-16M} no-bootscrub cpufreq=none maxcpus=1 guest_loglvl=all" \
  -initrd "$kernel ${cmdline//,/,,}$initrd" </dev/null >"$fifo" 2>&1 &
qemu_pid=$!

# Without isa-debug-exit Xen keeps the machine running after dom0 stops: end it on that line.
# The lines are relayed by awk, which reads the FIFO in blocks: bash's `read` takes one byte
# per system call, and on a loaded machine that loop relayed only ~25 KB/s, so a chatty guest's
# verdict waited for the relay, not for QEMU (docs/xen-pv.md, "Measurements"). awk's status:
# 1 = a QEMU error line, 2 = dom0 stopped; lines relayed from dom0's hvc console end in "\r\r".
# mawk (Debian's awk) waits for a full block unless told -W interactive; gawk returns what a
# read gives.
relay=(awk)
command -v mawk >/dev/null 2>&1 && relay=(mawk -W interactive)
"${relay[@]}" -v pid="$qemu_pid" -v qemu="$(basename "$qemu"):" '
  { sub(/\r+$/, ""); print; fflush() }
  index($0, qemu) == 1 { qemu_error = 1 }
  /Hardware Dom0 (halted|crashed|shutdown)/ && !stopped { stopped = 2; system("kill " pid " 2>/dev/null") }
  END { exit qemu_error + stopped }' <"$fifo"
relayed=$?
qemu_error=$((relayed & 1))
stopped=$((relayed & 2))
wait "$qemu_pid"
status=$?
echo "xen-run: verdict after $((($(date +%s%N) - start) / 1000000)) ms" >&2

# isa-debug-exit: the guest writes 0 (PASS) or 1 (FAIL); QEMU exits with (v << 1) | 1.
# QEMU's own failures (a file it cannot open, a bad option) also exit with status 1.
if [ "$qemu_error" != 0 ] && [ "$status" = 1 ]; then
  echo "xen-run: QEMU failed" >&2
  exit 2
fi
case $status in
  1) exit 0 ;;
  3) exit 1 ;;
  124) echo "xen-run: no verdict within ${timeout_s}s" >&2; exit 124 ;;
  *)
    [ "$stopped" != 0 ] && echo "xen-run: dom0 stopped without a verdict" >&2 ||
      echo "xen-run: QEMU exited with status $status without a verdict" >&2
    exit 3 ;;
esac

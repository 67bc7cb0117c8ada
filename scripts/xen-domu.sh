#!/usr/bin/env bash
# Boots a Xen PV kernel as a non-initial domain (domU) of Debian's Xen 4.17 under QEMU TCG:
# dom0 is Debian's Linux (scripts/debian-kernel.sh) with an initramfs holding busybox, Xen's
# toolstack (xl, xenstored, xenconsoled from xen-utils-4.17, unpacked, not installed) and the
# xen-evtchn/privcmd/gntdev/gntalloc/xenfs modules. Dom0's init starts xenstored and
# xenconsoled, runs `xl create` for KERNEL, waits until the domain is gone, prints the domU's
# console log (what its console ring carried) between "xen-domu: console begin/end" lines,
# and writes the verdict found there to isa-debug-exit through /dev/port.
#
#   scripts/xen-domu.sh KERNEL [CMDLINE]
#
# Exit status as scripts/xen-run.sh: 0 = the domU printed RESULT PASS, 1 = RESULT FAIL,
# 2 = bad usage or a missing prerequisite, 3 = no verdict, 124 = timed out.
# Environment: TIMEOUT in seconds (default 300); QEMU, XEN_GZ as for xen-run.sh.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 KERNEL [CMDLINE]" >&2
  exit 2
fi
kernel=$1
cmdline=${2-}
here=$(cd "$(dirname "$0")" && pwd)
[ -r "$kernel" ] || { echo "xen-domu: cannot read kernel '$kernel'" >&2; exit 2; }
case $cmdline in *'"'* | *\\*) echo "xen-domu: the command line must not contain '\"' or '\\'" >&2; exit 2 ;; esac
busybox=$(command -v busybox || true)
# ldd fails on a static executable.
[ -n "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1 ||
  { echo "xen-domu: a static busybox is needed (busybox-static); run scripts/install-deps.sh" >&2; exit 2; }
for tool in cpio gzip apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "xen-domu: '$tool' not found; run scripts/install-deps.sh" >&2; exit 2; }
done

debian=$("$here/debian-kernel.sh") || { echo "xen-domu: scripts/debian-kernel.sh failed" >&2; exit 2; }

# Xen's toolstack, unpacked once per user (concurrent callers wait for the first).
tools="${PREVIRT_CACHE:-$HOME/.cache/previrt}/xen-tools"
packages="xen-utils-4.17 libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenmisc4.17
  libxenstore4 libxentoollog1 libxenhypfs1 libxendevicemodel1 libxentoolcore1 libyajl2"
mkdir -p "$(dirname "$tools")"
exec 9>"$tools.lock"
flock 9
if [ ! -x "$tools/usr/lib/xen-4.17/bin/xl" ]; then
  fetch=$(mktemp -d) && chmod 0777 "$fetch" # apt-get download runs as _apt
  # shellcheck disable=SC2086 # the package list is a word list
  (cd "$fetch" && apt-get download -qq $packages) ||
    { rm -rf "$fetch"; echo "xen-domu: apt-get download of Xen's tools failed (apt-get update?)" >&2; exit 2; }
  rm -rf "$tools.tmp" && mkdir -p "$tools.tmp"
  for deb in "$fetch"/*.deb; do dpkg -x "$deb" "$tools.tmp"; done
  rm -rf "$fetch" "$tools" && mv "$tools.tmp" "$tools"
fi
exec 9>&-

work=$(mktemp -d "${TMPDIR:-/tmp}/xen-domu.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,xen,proc,sys,dev,run,tmp,mods,etc/xen,var/lib/xen,var/log/xen,lib64,lib}
ln -s /run "$root/var/run"
cp "$busybox" "$root/bin/busybox"
for applet in sh mount insmod mkdir cat sleep grep poweroff dd printf; do ln -s busybox "$root/bin/$applet"; done
cp "$tools"/usr/lib/xen-4.17/bin/{xl,xenstored,xenconsoled,xen-init-dom0} "$root/xen/"
cp -a "$tools"/usr/lib/x86_64-linux-gnu "$root/lib/"
# The tools' own libraries are there; add the system ones they link against.
for bin in "$root"/xen/* "$root"/lib/x86_64-linux-gnu/*.so*; do
  LD_LIBRARY_PATH=$root/lib/x86_64-linux-gnu ldd "$bin" 2>/dev/null | awk '$3 ~ /^\// { print $3 }'
done | sort -u | grep -v "^$root" | xargs -r -I{} cp -L {} "$root/lib/x86_64-linux-gnu/"
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$root/lib/x86_64-linux-gnu/" # pthread_cancel dlopens it
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
mods=$debian/modules/drivers/xen
cp "$mods"/{xen-evtchn,xen-privcmd,xen-gntdev,xen-gntalloc}.ko "$mods"/xenfs/xenfs.ko "$root/mods/"
cp "$kernel" "$root/domu.elf"
: >"$root/etc/xen/xl.conf"
cat >"$root/domu.cfg" <<EOF
name = "domu"
type = "pv"
kernel = "/domu.elf"
memory = 16
vcpus = 1
extra = "$cmdline"
on_poweroff = "destroy"
on_crash = "destroy"
EOF
cat >"$root/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/xen LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev
mount -t tmpfs run /run && mkdir -p /dev/pts /run/xen /run/xenstored && mount -t devpts devpts /dev/pts
for m in xen-evtchn xen-privcmd xen-gntdev xen-gntalloc xenfs; do insmod /mods/$m.ko; done
mount -t xenfs xenfs /proc/xen
stop() { echo "xen-domu: $1 failed"; poweroff -f; }
xenstored --pid-file /run/xenstored.pid || stop xenstored
xen-init-dom0 || stop xen-init-dom0
xenconsoled --log=guest --log-dir=/tmp --pid-file=/run/xenconsoled.pid || stop xenconsoled
xl create /domu.cfg || stop "xl create"
# The domain destroys itself on poweroff or crash (domu.cfg).
while xl list domu >/dev/null 2>&1; do sleep 1; done
echo "xen-domu: console begin"
cat /tmp/guest-domu.log
echo "xen-domu: console end"
verdict=3
grep -q '^RESULT PASS' /tmp/guest-domu.log && verdict=0
grep -q '^RESULT FAIL' /tmp/guest-domu.log && verdict=1
# isa-debug-exit: QEMU exits with (v << 1) | 1, which xen-run.sh turns into the verdict.
[ $verdict != 3 ] && printf "\\$verdict" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

DOM0_INITRD=$work/initrd.gz DOM0_MEM=512M MEM=1024 TIMEOUT=${TIMEOUT:-300} \
  "$here/xen-run.sh" "$debian/vmlinux" "console=hvc0 loglevel=4"

# Shared by bench/pvm.sh and bench/pvm_floor.sh (sourced from the repository's root; the
# functions that build or run need $work, the caller's scratch directory).

previrt=target/release/previrt

# Splits the command line: json=1 if --json is in it, the other words in args.
pvm_args() {
  json=0 args=()
  for a in "$@"; do
    if [ "$a" = --json ]; then json=1; else args+=("$a"); fi
  done
}

# The release binary; the example kernel plain ($work/plain/kernel-pvh.elf) and
# pre-virtualized and linked ($work/linked.elf); the host's TSC rate in $tsc_per_ns (KVM
# guests here and QEMU TCG read the host's TSC unscaled).
pvm_build() {
  cargo build --quiet --release --bin previrt
  "$previrt" toolchain install --prefix "$work/tc" >/dev/null
  make -s -C examples/kernel O="$work/plain" >/dev/null
  make -s -C examples/kernel O="$work/pre" CROSS_COMPILE="$work/tc/bin/x86_64-previrt-linux-gnu-" >/dev/null
  "$previrt" link "$work/pre/kernel-pvh.elf" -o "$work/linked.elf" >/dev/null 2>&1
  printf '#include <stdio.h>\n#include <time.h>\n#include <x86intrin.h>\nint main(void){struct timespec a,b;clock_gettime(CLOCK_MONOTONIC,&a);unsigned long long t=__rdtsc();struct timespec d={0,200000000};nanosleep(&d,0);unsigned long long u=__rdtsc();clock_gettime(CLOCK_MONOTONIC,&b);printf("%%.6f\\n",(double)(u-t)/((b.tv_sec-a.tv_sec)*1e9+(b.tv_nsec-a.tv_nsec)));return 0;}\n' >"$work/tsc.c"
  gcc -O2 -o "$work/tsc" "$work/tsc.c"
  tsc_per_ns=$("$work/tsc")
}

# pvm_guest OUT bench/NAME.S: bench/pvm_guest.S (the mode's set-up) linked with NAME.S, which
# provides pvm_compute; the objects stay in $work (pvm_guest.o, NAME.o).
pvm_guest() {
  local obj
  obj=$work/$(basename "$2" .S).o
  as --64 -o "$work/pvm_guest.o" bench/pvm_guest.S
  as --64 -o "$obj" "$2"
  ld -m elf_x86_64 -z max-page-size=4096 -Ttext=0x100000 -e _start -o "$1" "$work/pvm_guest.o" "$obj"
}

# One kernel run: set-up $1, kernel command line $2; leaves the output in $work/k.out and the
# VMM's statistics in $work/k.json, and prints the VMM's exits (0 for QEMU).
krun() {
  case $1 in
    emulated) "$previrt" run --backend pv --boot pvh --append "$2" --stats-json "$work/k.json" "$work/plain/kernel-pvh.elf" ;;
    hv) "$previrt" run --backend pv --boot pvh --append "previrt.backend=hv $2" --stats-json "$work/k.json" "$work/linked.elf" ;;
    pvm) "$previrt" run --backend native --boot pvh --append "previrt.backend=pvm $2" --stats-json "$work/k.json" "$work/linked.elf" ;;
    qemu) echo '{"exits": 0}' >"$work/k.json"; TIMEOUT=300 examples/kernel/run-qemu.sh "$work/plain/kernel-pvh.elf" "$2" ;;
  esac >"$work/k.out" 2>&1 || true
  grep -q '^RESULT PASS' "$work/k.out" || { echo "$0: $1 '$2' did not pass:" >&2; tail -5 "$work/k.out" >&2; exit 1; }
  [ "$1" != pvm ] || grep -q '^previrt-pvm: native=yes' "$work/k.out" || { echo "$0: pvm did not run natively" >&2; exit 1; }
  sed -n 's/^  "exits": *\([0-9]*\).*/\1/p' "$work/k.json"
}
# The kernel's own TIMING lines for workload $1 of the last run (TSC cycles), one a line.
cycles() { sed -n "s/^TIMING $1 seq=[0-9]* tsc=//p" "$work/k.out"; }

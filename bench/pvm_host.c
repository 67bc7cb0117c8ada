/* Host-process baseline for bench/pvm.sh: the guest's compute loop (pvm_loop.S) as a plain
   process. Prints "<result> <ns per iteration>" for N iterations (argv[1]). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

unsigned long pvm_compute(unsigned long n);

int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    unsigned long r = pvm_compute(n);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%lu %.3f\n", r, n ? ns / n : 0.0);
    return 0;
}

/*
 * The compute workload as a plain host process (the native-speed benchmark's reference):
 * the same loop from the same header, printing the same checksum line as the kernel, plus
 * the wall time of the loop.
 *
 *   compute-host [ITERATIONS]      (default 10000, like the kernel's compute=)
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "compute.h"

int main(int argc, char **argv)
{
	char *end = NULL;
	u64 iterations = argc > 1 ? strtoull(argv[1], &end, 10) : 10000;
	if (argc > 2 || (end && (*end || end == argv[1]))) {
		fprintf(stderr, "usage: %s [ITERATIONS]\n", argv[0]);
		return 2;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	u64 sum = compute_checksum(iterations);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	u64 ns = (u64)(t1.tv_sec - t0.tv_sec) * 1000000000UL + (u64)t1.tv_nsec - (u64)t0.tv_nsec;
	printf("WORKLOAD compute PASS checksum=%016lx\nTIMING compute ns=%lu\n", sum, ns);
	return 0;
}

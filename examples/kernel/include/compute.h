/* The compute workload's hash step: a loop-carried multiply/rotate chain, no memory traffic. */
#ifndef COMPUTE_H
#define COMPUTE_H

#include "checksum.h"
#include "types.h"

#define COMPUTE_SEED 0x9e3779b97f4a7c15UL

static inline u64 compute_hash(u64 iterations)
{
	u64 x = COMPUTE_SEED;
	for (u64 i = 0; i < iterations; i++) {
		x ^= i;
		x = (x << 13 | x >> 51) * 0xff51afd7ed558ccdUL;
		x ^= x >> 29;
	}
	return x;
}

/* What the compute workload reports for a given iteration count. */
static inline u64 compute_checksum(u64 iterations)
{
	return csum_add(csum_add(CSUM_INIT, iterations), compute_hash(iterations));
}

#endif

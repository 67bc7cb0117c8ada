/* The compute workload's hash step: a loop-carried multiply/rotate chain, no memory traffic. */
#ifndef COMPUTE_H
#define COMPUTE_H

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

#endif

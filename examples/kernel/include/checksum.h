/* Workload checksums: FNV-1a over 64-bit words (or bytes), deterministic by construction. */
#ifndef CHECKSUM_H
#define CHECKSUM_H

#include "types.h"

#define CSUM_INIT 0xcbf29ce484222325UL
static inline u64 csum_add(u64 h, u64 v) { return (h ^ v) * 0x100000001b3UL; }

#endif

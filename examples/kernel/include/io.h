/*
 * Memory-mapped I/O accessors, shaped like Linux's readl/writel: one explicit mov each, so a
 * device register access is exactly one instruction of the given width.
 */
#ifndef IO_H
#define IO_H

#include "types.h"

static inline u32 readl(const volatile void *addr)
{
	u32 v;
	asm volatile("movl %1, %0" : "=r"(v) : "m"(*(const volatile u32 *)addr) : "memory");
	return v;
}

static inline void writel(u32 v, volatile void *addr)
{
	asm volatile("movl %0, %1" : : "r"(v), "m"(*(volatile u32 *)addr) : "memory");
}

#endif

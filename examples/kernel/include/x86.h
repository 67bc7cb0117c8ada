/*
 * The privileged and sensitive x86 instructions, one small inline function each, the way a
 * real kernel writes them. Every use of such an instruction in C goes through this file.
 */
#ifndef X86_H
#define X86_H

#include "types.h"

#define X86_EFLAGS_IF (1UL << 9)
#define X86_CR0_WP (1UL << 16)
#define X86_CR4_PGE (1UL << 7)

static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
static inline void hlt(void) { asm volatile("hlt" ::: "memory"); }
/* sti's one-instruction interrupt shadow makes "sti; hlt" race-free against wakeups. */
static inline void safe_halt(void) { asm volatile("sti; hlt" ::: "memory"); }

static inline u64 save_flags(void)
{
	u64 flags;
	asm volatile("pushfq; popq %0" : "=r"(flags) : : "memory");
	return flags;
}

static inline void restore_flags(u64 flags)
{
	asm volatile("pushq %0; popfq" : : "g"(flags) : "memory", "cc");
}

static inline u64 irq_save(void)
{
	u64 flags = save_flags();
	cli();
	return flags;
}

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }

static inline u8 inb(u16 port)
{
	u8 v;
	asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

#define DEFINE_CR_ACCESSORS(n)                                                                 \
	static inline u64 read_cr##n(void)                                                     \
	{                                                                                      \
		u64 v;                                                                         \
		asm volatile("mov %%cr" #n ", %0" : "=r"(v) : : "memory");                     \
		return v;                                                                      \
	}                                                                                      \
	static inline void write_cr##n(u64 v)                                                  \
	{                                                                                      \
		asm volatile("mov %0, %%cr" #n : : "r"(v) : "memory");                         \
	}
DEFINE_CR_ACCESSORS(0)
DEFINE_CR_ACCESSORS(2)
DEFINE_CR_ACCESSORS(3)
DEFINE_CR_ACCESSORS(4)
#undef DEFINE_CR_ACCESSORS

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

struct cpuid_regs {
	u32 eax, ebx, ecx, edx;
};

static inline struct cpuid_regs cpuid(u32 leaf)
{
	struct cpuid_regs r;
	asm volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(0));
	return r;
}

static inline void invlpg(u64 va) { asm volatile("invlpg (%0)" : : "r"(va) : "memory"); }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

static inline void lgdt(const struct desc_ptr *p) { asm volatile("lgdt %0" : : "m"(*p) : "memory"); }
static inline void lidt(const struct desc_ptr *p) { asm volatile("lidt %0" : : "m"(*p) : "memory"); }
static inline void ltr(u16 sel) { asm volatile("ltr %0" : : "rm"(sel) : "memory"); }

#endif

/* CPU-state workloads: the interrupt flag, cpuid/MSRs, and pure computation. */
#include "compute.h"
#include "kernel.h"
#include "x86.h"

#define MSR_KERNEL_GS_BASE 0xc0000102
#define MSR_PATTERNS 16
#define CPUID_1_EDX_MSR (1 << 5)
/* compute_hash(1000), computed independently on the host: catches a corrupted register file. */
#define COMPUTE_KAT_ITERATIONS 1000
#define COMPUTE_KAT 0x8c375ccf07d62911UL

static volatile u64 shared_counter;

const char *wl_irqflag(u64 *checksum)
{
	u64 h = CSUM_INIT;
	shared_counter = 0;
	if (!(save_flags() & X86_EFLAGS_IF))
		return "interrupts disabled on entry";
	for (u64 i = 0; i < opt.irqflag_rounds; i++) {
		u64 outer = irq_save();
		u64 ticks = timer_ticks;
		if (save_flags() & X86_EFLAGS_IF)
			return "cli left IF set";
		u64 inner = irq_save();
		if (inner & X86_EFLAGS_IF)
			return "a nested save saw IF set";
		shared_counter += i; /* the critical section */
		restore_flags(inner);
		if (save_flags() & X86_EFLAGS_IF)
			return "restoring a disabled state enabled interrupts";
		if (timer_ticks != ticks)
			return "a timer interrupt arrived with IF clear";
		restore_flags(outer);
		if (!(save_flags() & X86_EFLAGS_IF))
			return "restoring an enabled state left interrupts disabled";
		if (i & 1) {
			/* popf that clears IF while it is set, then sti. */
			restore_flags(inner);
			h = csum_add(h, save_flags() & X86_EFLAGS_IF);
			sti();
		}
		h = csum_add(h, (outer & X86_EFLAGS_IF) | (inner & X86_EFLAGS_IF) << 1);
	}
	*checksum = csum_add(h, shared_counter);
	return NULL;
}

static bool printable(u32 word)
{
	for (unsigned i = 0; i < 4; i++) {
		u8 c = (u8)(word >> (8 * i));
		if (c < 0x20 || c > 0x7e)
			return false;
	}
	return true;
}

const char *wl_cpuid_msr(u64 *checksum)
{
	struct cpuid_regs l0 = cpuid(0), again = cpuid(0);
	if (l0.eax < 1)
		return "cpuid leaf 0 reports no leaf 1";
	if (!printable(l0.ebx) || !printable(l0.edx) || !printable(l0.ecx))
		return "cpuid vendor string is not printable";
	if (memcmp(&l0, &again, sizeof(l0)))
		return "cpuid leaf 0 changed between calls";
	if (!(cpuid(1).edx & CPUID_1_EDX_MSR))
		return "cpuid reports no rdmsr/wrmsr";

	u64 h = CSUM_INIT;
	u64 saved = rdmsr(MSR_KERNEL_GS_BASE);
	for (u64 k = 0; k < MSR_PATTERNS; k++) {
		u64 v = (0x00007f0000000000UL ^ (k * 0x0000012345678000UL)) & 0x00007ffffffff000UL;
		v |= k << 4; /* canonical: bits 47..63 clear */
		wrmsr(MSR_KERNEL_GS_BASE, v);
		u64 back = rdmsr(MSR_KERNEL_GS_BASE);
		if (back != v) {
			wrmsr(MSR_KERNEL_GS_BASE, saved);
			return "IA32_KERNEL_GS_BASE did not read back what was written";
		}
		h = csum_add(h, back);
	}
	wrmsr(MSR_KERNEL_GS_BASE, saved);
	if (rdmsr(MSR_KERNEL_GS_BASE) != saved)
		return "IA32_KERNEL_GS_BASE was not restored";
	*checksum = h;
	return NULL;
}

const char *wl_compute(u64 *checksum)
{
	static volatile u64 kat_iterations = COMPUTE_KAT_ITERATIONS; /* not folded at build time */
	if (compute_hash(kat_iterations) != COMPUTE_KAT)
		return "known-answer check of the hash failed";
	*checksum = compute_checksum(opt.compute);
	return NULL;
}

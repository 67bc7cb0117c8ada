/* Device workloads: PIT timer ticks while idle, the local APIC over MMIO, UART throughput. */
#include "format.h"
#include "io.h"
#include "kernel.h"
#include "mm.h"
#include "x86.h"

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1UL << 11)
#define APIC_BASE_X2APIC (1UL << 10)
#define APIC_BASE_ADDR_MASK 0x000ffffffffff000UL
#define LAPIC_PHYS 0xfee00000UL
#define APIC_ID 0x20
#define APIC_VERSION 0x30
#define APIC_TPR 0x80
#define CPUID_1_EDX_APIC (1 << 9)

const char *wl_timer(u64 *checksum)
{
	u32 divisor = pit_divisor((u32)opt.hz);
	pit_set_hz((u32)opt.hz);
	if (pit_read_count() > divisor)
		return "the PIT counter is outside its programmed range";
	u64 start = timer_ticks, halts = 0;
	for (;;) {
		cli();
		if (timer_ticks - start >= opt.ticks)
			break;
		safe_halt();
		halts++;
	}
	sti();
	if (opt.ticks && !halts)
		return "the CPU never halted";
	*checksum = csum_add(csum_add(csum_add(CSUM_INIT, opt.ticks), divisor), opt.hz);
	return NULL;
}

const char *wl_mmio(u64 *checksum)
{
	struct cpuid_regs l1 = cpuid(1);
	if (!(l1.edx & CPUID_1_EDX_APIC))
		return "cpuid reports no local APIC";
	u64 base = rdmsr(MSR_APIC_BASE);
	if (!(base & APIC_BASE_ENABLE) || (base & APIC_BASE_X2APIC))
		return "the local APIC is not enabled in xAPIC mode";
	if ((base & APIC_BASE_ADDR_MASK) != LAPIC_PHYS)
		return "the local APIC is not at 0xfee00000";

	volatile u8 *apic = ioremap_uc(LAPIC_PHYS);
	u32 version = readl(apic + APIC_VERSION) & 0xff;
	if (version < 0x10 || version > 0x15)
		return "unexpected local APIC version";
	if (readl(apic + APIC_ID) >> 24 != l1.ebx >> 24)
		return "APIC ID register disagrees with cpuid's initial APIC ID";

	u64 h = CSUM_INIT;
	u64 flags = irq_save();
	u32 saved = readl(apic + APIC_TPR);
	const char *why = NULL;
	for (u32 prio = 0; prio < 16 && !why; prio++) {
		writel(prio << 4, apic + APIC_TPR);
		u32 back = readl(apic + APIC_TPR) & 0xff;
		if (back != prio << 4)
			why = "the TPR did not read back what was written";
		h = csum_add(h, back);
	}
	writel(saved, apic + APIC_TPR);
	restore_flags(flags);
	*checksum = h;
	return why;
}

const char *wl_console(u64 *checksum)
{
	static const char text[] = "the quick brown fox jumps over the lazy dog 0123456789";
	const size_t text_len = sizeof(text) - 1;
	u64 h = CSUM_INIT, newlines = 0;
	for (u64 line = 0; line < opt.console_lines; line++) {
		char buf[96];
		size_t n = format(buf, sizeof(buf), "CONSOLE %04lu %s", line, text + line % text_len);
		/* Wrap the rotated text around so every line has the same length. */
		for (size_t i = 0; i < line % text_len; i++)
			buf[n++] = text[i];
		buf[n++] = '\n';
		for (size_t i = 0; i < n; i++) {
			con_putc(buf[i]);
			h = csum_add(h, (u8)buf[i]);
			newlines += buf[i] == '\n';
		}
	}
	if (newlines != opt.console_lines)
		return "wrote a different number of lines than asked";
	*checksum = csum_add(h, newlines);
	return NULL;
}

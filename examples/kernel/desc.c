/*
 * GDT (laid out like Linux's, so selectors mean the same thing to tools that know Linux),
 * TSS with an IST stack for double faults, and the IDT.
 */
#include "kernel.h"
#include "x86.h"

void load_segments(u64 cs, u64 ds);
extern const u64 vector_stub_table[256];
extern char ist_stack_top[], boot_stack_top[];

#define GDT_ENTRIES 10 /* TSS_SEL is entry 8 and takes two slots */
#define DF_VECTOR 8
#define DF_IST 1

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_high;
	u32 reserved;
} __attribute__((packed));

static u64 gdt[GDT_ENTRIES] __attribute__((aligned(16)));
static struct tss tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));

/* Segment descriptor flags nibble: G = 8, D/B = 4, L = 2. */
static const struct {
	u8 index, access, flags;
} gdt_layout[] = {
	{ 1, 0x9b, 0xc }, /* 0x08 kernel 32-bit code */
	{ 2, 0x9b, 0xa }, /* 0x10 KERNEL_CS: 64-bit code */
	{ 3, 0x93, 0xc }, /* 0x18 KERNEL_DS */
	{ 4, 0xfb, 0xc }, /* 0x23 user 32-bit code */
	{ 5, 0xf3, 0xc }, /* 0x2b user data */
	{ 6, 0xfb, 0xa }, /* 0x33 user 64-bit code */
};

static u64 seg_desc(u64 base, u32 limit, u8 access, u8 flags)
{
	return (limit & 0xffffUL) | ((base & 0xffffffUL) << 16) | ((u64)access << 40) |
	       ((u64)(limit >> 16 & 0xf) << 48) | ((u64)(flags & 0xf) << 52) |
	       ((base >> 24 & 0xff) << 56);
}

void gdt_init(void)
{
	for (size_t i = 0; i < ARRAY_SIZE(gdt_layout); i++)
		gdt[gdt_layout[i].index] = seg_desc(0, 0xfffff, gdt_layout[i].access, gdt_layout[i].flags);

	tss.rsp[0] = (u64)boot_stack_top;
	tss.ist[DF_IST - 1] = (u64)ist_stack_top;
	tss.iomap_base = sizeof(tss); /* no I/O bitmap */
	u64 base = (u64)&tss;
	gdt[TSS_SEL / 8] = seg_desc(base, sizeof(tss) - 1, 0x89, 0); /* available 64-bit TSS */
	gdt[TSS_SEL / 8 + 1] = base >> 32;

	struct desc_ptr p = { sizeof(gdt) - 1, (u64)gdt };
	lgdt(&p);
	load_segments(KERNEL_CS, KERNEL_DS);
	ltr(TSS_SEL);
}

void idt_init(void)
{
	for (unsigned v = 0; v < 256; v++) {
		u64 handler = vector_stub_table[v];
		idt[v] = (struct idt_gate){
			.offset_low = (u16)handler,
			.selector = KERNEL_CS,
			.ist = v == DF_VECTOR ? DF_IST : 0,
			.type_attr = 0x8e, /* present, DPL 0, 64-bit interrupt gate (clears IF) */
			.offset_mid = (u16)(handler >> 16),
			.offset_high = (u32)(handler >> 32),
		};
	}
	struct desc_ptr p = { sizeof(idt) - 1, (u64)idt };
	lidt(&p);
}

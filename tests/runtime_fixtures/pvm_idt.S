/*
 * IDT gates written after `lidt` (tests/pvm_tables.rs). A PVH kernel that loads an IDT whose
 * every gate goes to `unexpected`, and only then points #UD and vector 0x80 at its handlers,
 * changes them from interrupt to trap gates and 0x80 to another handler, and runs `ud2` and
 * `int $0x80` after each change with IF off and on. Each handler dumps ("D<case> ...", as
 * pvm_lean.S) its frame's RIP, RFLAGS (less RF), CS and SS and, in the dump's own RFLAGS,
 * the IF it runs with (an interrupt gate clears it, a trap gate keeps it). Last, `int $0x81`
 * through a gate whose present bit was cleared after `lidt`: the CPU raises #NP (error code
 * 0x81 * 8 + 2), whose handler dumps the error code and exits through isa-debug-exit.
 * Under QEMU TCG with previrt.backend=native (the real instructions) and under
 * `previrt run --backend native` with previrt.backend=pvm the dumps must be equal.
 */
#define CODE64 0x10
#include "dump.h"
#include "pvm_tables.h"

long_start:
	START
	/* Every gate below is written after the lidt. */
	GATE 6, ud_handler, 0x8e
	CASE 0x10, 0, ud2
	CASE 0x11, 1, ud2
	movb $0x8f, idt + 6 * 16 + 5
	CASE 0x12, 0, ud2
	CASE 0x13, 1, ud2

	GATE 0x80, int_a, 0x8e
	CASE 0x20, 0, int $0x80
	CASE 0x21, 1, int $0x80
	movb $0x8f, idt + 0x80 * 16 + 5
	CASE 0x22, 0, int $0x80
	CASE 0x23, 1, int $0x80
	GATE 0x80, int_b, 0x8e
	CASE 0x24, 1, int $0x80

	GATE 11, np_handler, 0x8e
	movb $0x0e, idt + 0x81 * 16 + 5
	CASE 0x30, 1, int $0x81
	/* Not reached: the #NP handler exits. */
	jmp unexpected

/* #UD: dump, return past the ud2. */
ud_handler:
	FRAME 0x200, 0
	addq $2, (%rsp)
	iretq

/* Vector 0x80, first and second handler. */
int_a:
	FRAME 0x210, 0
	iretq
int_b:
	FRAME 0x220, 0
	iretq

/* #NP: the error code in rdi, dump, exit with 0. */
np_handler:
	movq (%rsp), %rdi
	FRAME 0x230, 1
	cld
	movb $0, %al
	outb %al, $0xf4
2:	hlt
	jmp 2b

	.data
	.balign 16
/* The example kernel's (Linux's) layout, with the user segments the mode runs on. */
gdt:
	.quad 0
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x10 code64 */
	.quad 0x00cf92000000ffff        /* 0x18 data */
	.quad 0
	.quad 0x00cff3000000ffff        /* 0x2b user data */
	.quad 0x00affb000000ffff        /* 0x33 user code64 */
gdt_end:
gdtr:
	.word gdt_end - gdt - 1
	.quad gdt

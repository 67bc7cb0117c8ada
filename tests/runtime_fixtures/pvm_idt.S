/*
 * IDT gates written after `lidt` (tests/pvm_tables.rs). A PVH kernel that loads an IDT whose
 * every gate goes to `unexpected`, and only then points #UD and vector 0x80 at its handlers,
 * changes them from interrupt to trap gates and 0x80 to another handler, and runs `ud2` and
 * `int $0x80` after each change with IF off and on. Each handler dumps ("D<case> ...", as
 * pvm_lean.S) its frame's RIP, RFLAGS (less RF), CS and SS and, in the dump's own RFLAGS,
 * the IF it runs with (an interrupt gate clears it, a trap gate keeps it). Then deliveries
 * through gates the table does not have: `int $0x81` and `ud2` through gates whose present
 * bit was cleared after `lidt` raise #NP (also `int3`), `int $0x81` beyond a shorter table's
 * limit #GP
 * (error code: the vector, the IDT bit, EXT for an event not raised by software; RIP at a
 * software interrupt); their handlers dump the error code and return past the instruction.
 * Last, `int $0x81` with the #NP gate cleared too: the CPU raises #DF, whose handler dumps
 * and exits through isa-debug-exit.
 * Under QEMU TCG with previrt.backend=native (the real instructions) and under
 * `previrt run --backend native` with previrt.backend=pvm the dumps must be equal.
 */
#define CODE64 0x10
#include "dump.h"
#include "pvm_tables.h"

/* `int3`, then one byte the #NP handler's return (2 bytes on) skips. */
.macro INT3_NOP
	int3
	nop
.endm

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
	GATE 13, gp_handler, 0x8e
	movb $0x0e, idt + 0x81 * 16 + 5
	CASE 0x30, 1, int $0x81
	movb $0x0e, idt + 6 * 16 + 5
	CASE 0x31, 0, ud2
	lidt idtr_short
	CASE 0x32, 1, int $0x81
	lidt idtr
	movb $0x0e, idt + 3 * 16 + 5
	CASE 0x34, 1, INT3_NOP

	GATE 8, df_handler, 0x8e
	movb $0x0e, idt + 11 * 16 + 5
	CASE 0x33, 1, int $0x81
	/* Not reached: the #DF handler exits. */
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

/* #NP, #GP: the error code in rdi, dump \n, return past the (2-byte) instruction. */
.macro ERROR_HANDLER n
	movq (%rsp), %rdi
	FRAME \n, 1
	addq $8, %rsp
	addq $2, (%rsp)
	iretq
.endm
np_handler:
	ERROR_HANDLER 0x230
gp_handler:
	ERROR_HANDLER 0x240

/* #DF: the error code in rdi, dump, exit with 0. */
df_handler:
	movq (%rsp), %rdi
	FRAME 0x250, 1
	EXIT 0

	LINUX_GDT
	.data
/* The IDT with its last gate 0x80. */
idtr_short:
	.word 0x81 * 16 - 1
	.quad idt

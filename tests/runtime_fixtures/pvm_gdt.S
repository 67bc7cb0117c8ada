/*
 * A kernel whose GDT lacks the user segments KVM-PVM's native mode runs on (0x2b data, 0x33
 * 64-bit code: docs/pvm.md), for tests/pvm_tables.rs: null, 0x08 code32, 0x10 code64, 0x18
 * data, as bench/pvm_guest.S without its user segments. With known flags and GPRs it dumps
 * ("D<case> ...", as pvm_lean.S) what `sgdt` and `sidt` store, then runs `sti` (the pvm
 * backend's first trapping `sti; iretq`), `cli`, pushf/popf, `ud2` and `int $0x80` into
 * interrupt-gate handlers (set after `lidt`; they dump their frame's RIP, CS, RFLAGS less RF
 * and SS), then loads a second GDT with `lgdt` (one more descriptor) and dumps `sgdt` and a
 * `ud2` again.
 * Under QEMU TCG with previrt.backend=native (the real instructions) and under
 * `previrt run --backend native` with previrt.backend=pvm the dumps must be equal.
 * With SLOTS_TAKEN defined (pvm_gdt_taken.S) its GDT holds ring-0 descriptors at 0x28 and
 * 0x30, the mode's selectors; with MIGRATE (pvm_gdt_migrate.S) it spends ~2 s in a loop of
 * sites before the second GDT, checking `sgdt` and printing a "P" line every 2^27 TSC
 * cycles.
 */
#define CODE64 0x10
#include "dump.h"
#include "pvm_tables.h"

/* Case \n: `sgdt` into rbx (limit) and rcx (base), `sidt` into rsi and rdi; dump. */
.macro TABLES n
	xorl %eax, %eax
	LOAD \n
	sgdt table_buf
	movzwq table_buf, %rbx
	movq table_buf + 2, %rcx
	sidt table_buf
	movzwq table_buf, %rsi
	movq table_buf + 2, %rdi
	DUMP \n
.endm

long_start:
	START
	GATE 6, ud_handler, 0x8e
	GATE 0x80, int_handler, 0x8e

	TABLES 0x3
	CASE 0x10, 0, sti
	CASE 0x11, 1, cli
	CASE 0x12, 1, pushfq; popq %rbx
	CASE 0x13, 0, pushq $0x2d7; popfq
	CASE 0x14, 0, ud2
	CASE 0x15, 1, ud2
	CASE 0x16, 1, int $0x80
	CASE 0x17, 0, int $0x80
#ifdef MIGRATE
	/* 2^32 TSC cycles of sites to be migrated in, a "P" line every 2^27; `sgdt` must show
	 * the kernel's table on every platform (else `unexpected`). */
	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	movq %rax, %r12
	movq %rax, %r13
9:	sgdt table_buf
	cmpw $gdt_end - gdt - 1, table_buf
	jne unexpected
	cli
	sti
	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	movq %rax, %r14
	subq %r12, %rax
	shrq $32, %rax
	jnz 8f
	cmpq %r13, %r14
	jb 9b
	addq $1 << 27, %r13
	movb $'P', %al
	call putc
	movb $'\n', %al
	call putc
	jmp 9b
8:
#endif
	lgdt gdtr2
	TABLES 0x4
	CASE 0x18, 1, ud2

	EXIT 0

/* #UD: dump, return past the ud2. */
ud_handler:
	FRAME 0x200, 0
	addq $2, (%rsp)
	iretq

int_handler:
	FRAME 0x210, 0
	iretq

	.data
	.balign 16
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff        /* 0x08 code32 */
	.quad 0x00af9b000000ffff        /* 0x10 code64 */
	.quad 0x00cf93000000ffff        /* 0x18 data */
#ifdef SLOTS_TAKEN
	.quad 0
	.quad 0x00cf93000000ffff        /* 0x28 ring-0 data */
	.quad 0x00af9b000000ffff        /* 0x30 ring-0 code64 */
#endif
gdt_end:
gdtr:
	.word gdt_end - gdt - 1
	.quad gdt
/* The second table: the same descriptors and one more data segment at 0x20. */
	.balign 16
gdt2:
	.quad 0
	.quad 0x00cf9b000000ffff
	.quad 0x00af9b000000ffff
	.quad 0x00cf93000000ffff
	.quad 0x00cf93000000ffff        /* 0x20 data */
gdt2_end:
gdtr2:
	.word gdt2_end - gdt2 - 1
	.quad gdt2
table_buf:
	.skip 10


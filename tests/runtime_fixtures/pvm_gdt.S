/*
 * A kernel whose GDT lacks the user segments KVM-PVM's native mode runs on (0x2b data, 0x33
 * 64-bit code: docs/pvm.md), for tests/pvm_tables.rs: null, 0x08 code32, 0x10 code64, 0x18
 * data, as bench/pvm_guest.S without its user segments. With known flags and GPRs it dumps
 * ("D<case> ...", as pvm_lean.S) what `sgdt` and `sidt` store, then runs `sti` (the pvm
 * backend's first trapping `sti; iretq`), `cli`, pushf/popf, `ud2` and `int $0x80` into
 * interrupt-gate handlers (which dump their frame's RIP, CS, RFLAGS less RF and SS), then
 * loads a second GDT with `lgdt` (one more descriptor) and dumps `sgdt` and a `ud2` again.
 * Under QEMU TCG with previrt.backend=native (the real instructions) and under
 * `previrt run --backend native` with previrt.backend=pvm the dumps must be equal.
 * With SLOTS_TAKEN defined (pvm_gdt_taken.S) its GDT holds ring-0 descriptors at 0x28 and
 * 0x30, the mode's selectors.
 */
#define CODE64 0x10
#include "dump.h"

/* Case \n: IF from \if_on, known flags (ZF PF) and registers, dump, \insn, dump. */
.macro CASE n, if_on, insn:vararg
	.if \if_on
	sti
	.else
	cli
	.endif
	xorl %eax, %eax
	LOAD \n
	DUMP \n
	\insn
	DUMP \n + 0x100
.endm

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
	movw $0x18, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movq $stack_top, %rsp
	/* 64-bit CR3 load and lidt: sites, after which the pvm backend runs the kernel natively. */
	movq $pml4, %rax
	movq %rax, %cr3
	call idt_init
	lidt idtr
	/* Mask both PICs so that sti takes no interrupt (the BIOS left the timer running). */
	movb $0xff, %al
	outb %al, $0x21
	outb %al, $0xa1

	TABLES 0x3
	CASE 0x10, 0, sti
	CASE 0x11, 1, cli
	CASE 0x12, 1, pushfq; popq %rbx
	CASE 0x13, 0, pushq $0x2d7; popfq
	CASE 0x14, 0, ud2
	CASE 0x15, 1, ud2
	CASE 0x16, 1, int $0x80
	CASE 0x17, 0, int $0x80
	lgdt gdtr2
	TABLES 0x4
	CASE 0x18, 1, ud2

	cld
	movb $0, %al
	outb %al, $0xf4
2:	hlt
	jmp 2b

/* Every gate to `unexpected`, #UD's to `ud_handler`, 0x80's to `int_handler` (interrupt
 * gates, selector 0x10). */
idt_init:
	leaq idt(%rip), %rdi
	leaq unexpected(%rip), %rax
	movl $256, %ecx
1:	movw %ax, (%rdi)
	movw $0x10, 2(%rdi)
	movw $0x8e00, 4(%rdi)
	movq %rax, %rdx
	shrq $16, %rdx
	movw %dx, 6(%rdi)
	shrq $16, %rdx
	movl %edx, 8(%rdi)
	movl $0, 12(%rdi)
	addq $16, %rdi
	decl %ecx
	jnz 1b
	leaq ud_handler(%rip), %rax
	movw %ax, idt + 6 * 16
	shrq $16, %rax
	movw %ax, idt + 6 * 16 + 6
	leaq int_handler(%rip), %rax
	movw %ax, idt + 0x80 * 16
	shrq $16, %rax
	movw %ax, idt + 0x80 * 16 + 6
	ret

/* The frame into registers: RIP rsi, CS rcx, RFLAGS less RF rbx, SS rdx; then dump \n. */
.macro FRAME n
	movq (%rsp), %rsi
	movq 8(%rsp), %rcx
	movq 16(%rsp), %rbx
	andq $~0x10000, %rbx
	movq 32(%rsp), %rdx
	DUMP \n
.endm

/* #UD: dump, return past the ud2. */
ud_handler:
	FRAME 0x200
	addq $2, (%rsp)
	iretq

int_handler:
	FRAME 0x210
	iretq

/* No other exception or interrupt is expected: say so and exit with 0x3f. */
unexpected:
	movb $'X', %al
	call putc
	movb $'\n', %al
	call putc
	movb $0x3f, %al
	outb %al, $0xf4
3:	hlt
	jmp 3b

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
idtr:
	.word 256 * 16 - 1
	.quad idt
table_buf:
	.skip 10

	.bss
	.balign 16
idt:	.skip 256 * 16
	.balign 16
	.skip 16384
stack_top:

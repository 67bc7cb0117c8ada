/*
 * Shared by pvm_idt.S and pvm_gdt.S (#included after dump.h): the 64-bit start (data
 * segments, stack, a CR3 load and `lidt` — sites, after which the pvm backend runs the kernel
 * natively — and both PICs masked), an IDT whose every gate goes to `unexpected`, and the
 * macros for gates, cases and handler frames.
 */

/* Gate \vec: \handler, selector 0x10, type byte \type (0x8e interrupt, 0x8f trap gate). */
.macro GATE vec, handler, type
	leaq \handler(%rip), %rax
	movw %ax, idt + \vec * 16
	movw $0x10, idt + \vec * 16 + 2
	movw $(\type << 8), idt + \vec * 16 + 4
	shrq $16, %rax
	movw %ax, idt + \vec * 16 + 6
	shrq $16, %rax
	movl %eax, idt + \vec * 16 + 8
.endm

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

/* A handler's frame (after an error code, if \err) into registers: RIP rsi, CS rcx, RFLAGS
 * less RF (which only faults set) rbx, SS rdx; then dump \n. */
.macro FRAME n, err
	movq (8 * \err)(%rsp), %rsi
	movq (8 * \err + 8)(%rsp), %rcx
	movq (8 * \err + 16)(%rsp), %rbx
	andq $~0x10000, %rbx
	movq (8 * \err + 32)(%rsp), %rdx
	DUMP \n
.endm

/* The fixture's `long_start` begins with this. */
.macro START
	movw $0x18, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movq $stack_top, %rsp
	movq $pml4, %rax
	movq %rax, %cr3
	call idt_init
	lidt idtr
	/* The BIOS left the timer running: sti must take no interrupt. */
	movb $0xff, %al
	outb %al, $0x21
	outb %al, $0xa1
.endm

/* Every gate to `unexpected` (interrupt gate, selector 0x10). */
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
	ret

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
idtr:
	.word 256 * 16 - 1
	.quad idt

	.bss
	.balign 16
idt:	.skip 256 * 16
	.balign 16
	.skip 16384
stack_top:

	.text

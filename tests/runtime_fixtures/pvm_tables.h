/*
 * Shared by the pvm fixtures (pvm_idt.S, pvm_gdt.S, pvm_lean.S, pvm_retry.S; #included after
 * dump.h): the 64-bit start (data segments, stack, a CR3 load and `lidt` — sites, after which
 * the pvm backend runs the kernel natively — and both PICs masked), an IDT whose every gate
 * goes to `unexpected`, the macros for gates, flags, cases, page faults and handler frames, a
 * #PF handler that dumps CR2 and the error code, and the example kernel's (Linux's) GDT.
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

/* Arithmetic flags from \ah (sahf: SF ZF AF PF CF), OF from \of, DF from \df; without
 * pushf/popf (sites under test in pvm_lean.S). */
.macro FLAGS ah, of, df
	.if \of
	movb $0x7f, %al
	addb $1, %al
	.else
	xorl %eax, %eax
	.endif
	movb $\ah, %ah
	sahf
	.if \df
	std
	.else
	cld
	.endif
.endm

/* A case's start: IF from \if_on, flags (FLAGS \ah, \of, \df), registers, dump \n. */
.macro CASE_START n, if_on, ah, of, df
	.if \if_on
	sti
	.else
	cli
	.endif
	FLAGS \ah, \of, \df
	LOAD \n
	DUMP \n
.endm

/* Case \n: its start, \insn, dump. (\insn is a statement of each case macro's own body: the
 * previrt assembler makes a sensitive instruction passed to a macro a site only there, not
 * when it is forwarded to another macro.) */
.macro FLAGS_CASE n, if_on, ah, of, df, insn:vararg
	CASE_START \n, \if_on, \ah, \of, \df
	\insn
	DUMP \n + 0x100
.endm

/* Case \n with ZF and PF set, the other flags clear. */
.macro CASE n, if_on, insn:vararg
	CASE_START \n, \if_on, 0x44, 0, 0
	\insn
	DUMP \n + 0x100
.endm

/* Case \n: a page fault in \insn with %rdi = `unmapped` (the first byte past the first GiB,
 * which dump.h maps), %rcx = 3, %r15 where to resume; `pf_dump` (the fixture sets gate 14)
 * dumps CR2 and the error code. */
	.set unmapped, 0x40000000
.macro FAULT n, insn:vararg
	FLAGS 0x00, 0, 0
	LOAD \n
	movq $unmapped, %rdi
	movl $3, %ecx
	leaq 1f(%rip), %r15
	\insn
1:
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

/* Exit through isa-debug-exit with \status. */
.macro EXIT status
	cld
	movb $\status, %al
	outb %al, $0xf4
2:	hlt
	jmp 2b
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

/* #PF: CR2 in rbx, the error code in rcx, dump, resume at %r15 (FAULT). */
pf_dump:
	movq %cr2, %rbx
	popq %rcx
	movq %r15, (%rsp)
	DUMP 0x500
	iretq

/* No other exception or interrupt is expected: say so and exit with 0x3f. */
unexpected:
	movb $'X', %al
	call putc
	movb $'\n', %al
	call putc
	EXIT 0x3f

/* The example kernel's (Linux's) GDT: 0x10/0x18 kernel code/data, which the pvm backend
 * shows handlers, and 0x2b/0x33 user data/code, which KVM-PVM's native mode runs the kernel
 * on: the host checks an emulated iretq's target and a gate's selector against this table
 * (without them the first trapping `sti; iretq` is a #GP(0x30), then a triple fault). For
 * the fixtures whose `gdtr` (dump.h loads it) is this one. */
.macro LINUX_GDT
	.pushsection .data
	.balign 16
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
	.popsection
.endm

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

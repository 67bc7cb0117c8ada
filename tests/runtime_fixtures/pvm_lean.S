/*
 * Register/flags-exact guest for the pvm backend's lean interrupt-flag entries
 * (tests/pvm.rs). A PVH kernel that, with known flags and GPRs, runs cli, sti, pushf and popf
 * (64-bit: the lean entries while native; 16-bit: the stub), ud2 into an interrupt-gate
 * handler (the backend's exception entry), sidt/sgdt, and page faults (CR2 and the error
 * code as the handler sees them), and prints every GPR and RFLAGS before and after
 * each ("D<case> ..." lines, whole RFLAGS: the kernel's view of IF must be
 * exact too) on COM1, then exits through isa-debug-exit. Built with the previrt toolchain
 * and linked with the runtime: under QEMU TCG with previrt.backend=native (the real
 * instructions) and under `previrt run --backend native` with previrt.backend=pvm it must
 * print the same lines.
 *
 * Flags are set without pushf/popf (those are the sites under test): OF by an add that
 * overflows (or xor clearing it), SF ZF AF PF CF by sahf, DF by std/cld; the GPRs after that
 * by movabs, which leaves the flags alone.
 */
#define CODE64 0x10
#include "dump.h"

/* Arithmetic flags from \ah (sahf: SF ZF AF PF CF), OF from \of, DF from \df. */
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

/* Case \n: IF from \if_on, flags, registers, dump, the instruction(s), dump. */
.macro CASE n, if_on, ah, of, df, insn:vararg
	.if \if_on
	sti
	.else
	cli
	.endif
	FLAGS \ah, \of, \df
	LOAD \n
	DUMP \n
	\insn
	DUMP \n + 0x100
.endm

/* Case \n: a page fault in \insn with %rdi = `unmapped` (the first byte past the mapped
 * first GiB), %rcx = 3, %r15 where to resume; the #PF handler dumps CR2 and the error code. */
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

/* Every instruction under test with flag pattern \ah/\of/\df and IF on and off; cases from \base. */
.macro PATTERN base, ah, of, df, img
	CASE \base + 0, 0, \ah, \of, \df, cli
	CASE \base + 1, 1, \ah, \of, \df, cli
	CASE \base + 2, 0, \ah, \of, \df, sti
	CASE \base + 3, 1, \ah, \of, \df, sti
	CASE \base + 4, 0, \ah, \of, \df, pushfq; popq %rbx
	CASE \base + 5, 1, \ah, \of, \df, pushfq; popq %rbx
	CASE \base + 6, 0, \ah, \of, \df, pushq $\img; popfq
	CASE \base + 7, 1, \ah, \of, \df, pushq $\img; popfq
	CASE \base + 8, 0, \ah, \of, \df, pushq $\img | 0x200; popfq
	CASE \base + 9, 1, \ah, \of, \df, pushq $\img | 0x200; popfq
	CASE \base + 10, 1, \ah, \of, \df, pushfw; popw %bx
	CASE \base + 11, 0, \ah, \of, \df, pushw $(\img & 0xffff) | 0x200; popfw
	CASE \base + 12, 1, \ah, \of, \df, pushw $\img & 0xfdff; popfw
	CASE \base + 13, 0, \ah, \of, \df, ud2
	CASE \base + 14, 1, \ah, \of, \df, ud2
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

	/* sidt and sgdt show the kernel's tables (not a substitute the backend loaded). */
	FLAGS 0x00, 0, 0
	LOAD 0x3
	sidt table_buf
	movzwq table_buf, %rbx
	movq table_buf + 2, %rcx
	sgdt table_buf
	movzwq table_buf, %rsi
	movq table_buf + 2, %rdi
	DUMP 0x300

	PATTERN 0x10, 0xd5, 1, 1, 0x0cd7
	PATTERN 0x30, 0x00, 0, 0, 0x0002
	PATTERN 0x50, 0x41, 1, 0, 0x200843
	PATTERN 0x70, 0x94, 0, 1, 0x0496

	/* Page faults on the unmapped second GiB, in forms the pvm backend decodes the address
	 * of and forms it reads CR2 for (push, an access crossing into the unmapped page). No
	 * read-modify-write form: its error code differs between CPUs (QEMU TCG reports a read,
	 * this host's CPU a write). */
	FAULT 0x400, movq (%rdi), %rax
	FAULT 0x401, movl %esi, 8(%rdi)
	FAULT 0x402, movb $0x5a, 0x123(%rdi, %rcx, 4)
	FAULT 0x403, cmpq %rax, 0x10(%rdi)
	FAULT 0x404, movzbl 0x7ff(%rdi), %eax
	FAULT 0x405, movw $0x1234, 0x10(%rdi, %rcx, 8)
	FAULT 0x406, movq unmapped + 0x88(%rip), %rdx
	FAULT 0x407, pushq 0x20(%rdi)
	FAULT 0x408, movq -4(%rdi), %rax

	cld
	movb $0, %al
	outb %al, $0xf4
2:	hlt
	jmp 2b

/* Every gate to `unexpected` (interrupt gate, selector 0x10), #UD's to `ud_handler`. */
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
	leaq pf_handler(%rip), %rax
	movw %ax, idt + 14 * 16
	shrq $16, %rax
	movw %ax, idt + 14 * 16 + 6
	ret

/* #PF: CR2 in rbx, the error code in rcx, dump, resume at %r15. */
pf_handler:
	movq %cr2, %rbx
	popq %rcx
	movq %r15, (%rsp)
	DUMP 0x500
	iretq

/* #UD (interrupt gate): dump what the handler sees (IF clear, the interrupted flags
 * otherwise) with the frame's RFLAGS (less RF, which only faults may set) in rbx and its
 * CS and SS in rcx and rdx, then return past the ud2. */
ud_handler:
	movq 16(%rsp), %rbx
	andq $~0x10000, %rbx
	movq 8(%rsp), %rcx
	movq 32(%rsp), %rdx
	DUMP 0x200
	addq $2, (%rsp)
	iretq

/* No exception or interrupt is expected: say so and exit with 0x3f. */
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
/* The example kernel's (Linux's) layout: 0x10/0x18 kernel code/data, which the pvm backend
 * shows handlers, and 0x2b/0x33 user data/code, which KVM-PVM's native mode runs the kernel
 * on: the host checks an emulated iretq's target and a gate's selector against this table
 * (without them the first trapping `sti; iretq` is a #GP(0x30), then a triple fault). */
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

/*
 * Register-dump guest for the runtime's differential test (tests/runtime_regdump.rs).
 * A PVH kernel that runs each privileged instruction the runtime emulates with known register
 * contents and prints every GPR and RFLAGS after it ("D<n> ..." lines) on COM1, then exits
 * through isa-debug-exit. Built plainly and with the previrt toolchain; the plain run, the
 * native backend and the trace backend must print the same dumps.
 */
#define CODE64 0x08
#include "dump.h"

long_start:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movq $stack_top, %rsp
	/* Mask both PICs so that sti takes no interrupt (the BIOS left the timer running). */
	movb $0xff, %al
	outb %al, $0x21
	outb %al, $0xa1

	LOAD 1
	cli
	DUMP 1
	LOAD 2
	sti
	DUMP 2
	LOAD 3
	pushq $0x8d7
	popfq
	pushfq
	popq %rbx
	DUMP 3
	LOAD 4
	pushfq
	cli
	popfq
	DUMP 4
	LOAD 5
	movl $0, %eax
	cpuid
	DUMP 5
	LOAD 6
	movl $1, %eax
	xorl %ecx, %ecx
	cpuid
	andl $0x00ffffff, %ebx      /* the initial APIC id field is per CPU */
	DUMP 6
	LOAD 7
	movl $0x277, %ecx
	rdmsr
	DUMP 7
	LOAD 8
	movl $0x277, %ecx
	movl $0x00070106, %eax
	movl $0x00070406, %edx
	wrmsr
	xorl %eax, %eax
	xorl %edx, %edx
	rdmsr
	DUMP 8
	LOAD 9
	movq %cr0, %rax
	movq %cr4, %r11
	movq %cr3, %r13
	movq %r13, %cr3
	DUMP 9
	LOAD 10
	movb $0x0f, %al
	outb %al, $0x70
	inb $0x71, %al
	/* COM1's line and modem control registers: configuration only. (Line status moved with
	 * the host's timing: its data-ready bit read differently in two runs under a loaded
	 * full suite, QEMU's stdin being /dev/null.) */
	movw $0x3fb, %dx
	inb %dx, %al
	inw %dx, %ax
	DUMP 10
	LOAD 11
	movq $scratch_page, %rax
	invlpg (%rax)
	invlpg 64(%rax, %rcx, 4)
	DUMP 11
	LOAD 12
	movq $gdt_copy, %rax
	sgdt (%rax)
	lgdt (%rax)
	sidt 16(%rax)
	lidt 16(%rax)
	sgdt gdt_copy + 32          /* absolute operands: the linker fills the displacement */
	lgdt gdt_copy + 32
	movq 2(%rax), %r9
	movzwq (%rax), %r10
	DUMP 12
	LOAD 13
	movw $0x18, %cx
	ltr %cx
	str %r12
	DUMP 13
	LOAD 14
	movq %rsp, %r8
	pushq $0x10
	pushq %r8
	pushq $0x46
	pushq $0x08
	pushq $1f
	iretq
1:	DUMP 14
	LOAD 15
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	DUMP 15

	movb $0, %al
	outb %al, $0xf4
2:	hlt
	jmp 2b

	.data
	.balign 16
gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x08 code64 */
	.quad 0x00cf92000000ffff        /* 0x10 data */
	.quad 0x0000890900000067        /* 0x18 TSS at 0x90000 (free low memory), low half */
	.quad 0                         /* TSS (high) */
gdt_end:
gdtr:
	.word gdt_end - gdt - 1
	.quad gdt
gdt_copy:
	.skip 48

	.bss
	.balign 4096
scratch_page: .skip 4096
	.balign 16
	.skip 16384
stack_top:

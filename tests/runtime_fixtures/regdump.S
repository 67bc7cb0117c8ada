/*
 * Register-dump guest for the runtime's differential test (tests/runtime_regdump.rs).
 * A PVH kernel that runs each privileged instruction the runtime emulates with known register
 * contents and prints every GPR and RFLAGS after it ("D<n> ..." lines) on COM1, then exits
 * through isa-debug-exit. Built plainly and with the previrt toolchain; the plain run, the
 * native backend and the trace backend must print the same dumps.
 */
	.set COM1, 0x3f8

	.section .note.Xen, "a"
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long pvh_start

	.section .head32, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	movl $pml4, %edi
	movl $pdpt + 3, (%edi)
	movl $pd + 3, pdpt
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax
	movl %eax, pd(, %ecx, 8)
	incl %ecx
	cmpl $512, %ecx
	jb 1b
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	lgdt gdtr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	ljmp $0x08, $long_start

	.text
	.code64
/* Load every GPR but rsp with a pattern derived from \seed. */
.macro LOAD seed
	movabsq $0x1111111111111111 * \seed, %rax
	movabsq $0x0123456789abcdef ^ (0x1010101010101010 * \seed), %rbx
	movabsq $0x2222222222222222 ^ \seed, %rcx
	movabsq $0x3333333333333333 + \seed, %rdx
	movabsq $0x4444444444444444 - \seed, %rsi
	movabsq $0x5555555555555555 ^ (\seed << 8), %rdi
	movabsq $0x6666666666666666 + (\seed << 16), %rbp
	movabsq $0x7777777777777777 ^ (\seed << 24), %r8
	movabsq $0x8888888888888888 ^ (\seed << 32), %r9
	movabsq $0x9999999999999999 - (\seed << 4), %r10
	movabsq $0xaaaaaaaaaaaaaaaa ^ (\seed << 12), %r11
	movabsq $0xbbbbbbbbbbbbbbbb + (\seed << 20), %r12
	movabsq $0xcccccccccccccccc ^ (\seed << 28), %r13
	movabsq $0xdddddddddddddddd - (\seed << 36), %r14
	movabsq $0xeeeeeeeeeeeeeeee ^ (\seed << 44), %r15
.endm

.macro DUMP n
	pushq $\n
	call dump
.endm

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

/* Print "D<n>" then every GPR and RFLAGS as they were at the DUMP, preserving them. */
dump:
	pushfq
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rbx
	pushq %rbp
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movb $'D', %al
	call putc
	movq 136(%rsp), %rax          /* n: above the return address */
	addb $'a', %al
	call putc
	leaq 112(%rsp), %rbx          /* saved rax; walk down to r15 at 0(%rsp) */
	movl $15, %ebp
3:	movb $' ', %al
	call putc
	movq (%rbx), %rax
	call puthex
	subq $8, %rbx
	decl %ebp
	jnz 3b
	movb $' ', %al
	call putc
	movq 120(%rsp), %rax          /* rflags */
	call puthex
	movb $'\n', %al
	call putc
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rbp
	popq %rbx
	popq %rdx
	popq %rcx
	popq %rax
	popfq
	ret $8

puthex:
	movl $16, %ecx
4:	rolq $4, %rax
	pushq %rax
	andl $15, %eax
	movb hexdigits(%rax), %al
	pushq %rcx
	call putc
	popq %rcx
	popq %rax
	decl %ecx
	jnz 4b
	ret

putc:
	pushq %rdx
	pushq %rax
	movw $COM1 + 5, %dx
5:	inb %dx, %al
	testb $0x20, %al
	jz 5b
	popq %rax
	movw $COM1, %dx
	outb %al, %dx
	popq %rdx
	ret

	.section .rodata
hexdigits:
	.ascii "0123456789abcdef"

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
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096
scratch_page: .skip 4096
	.balign 16
	.skip 16384
stack_top:

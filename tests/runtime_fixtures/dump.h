/*
 * Shared by the register-dump fixtures (regdump.S, the pvm_*.S; #included after
 * `#define CODE64 <selector>`): the PVH note; a 32-bit entry that identity-maps the first GiB
 * (2 MiB pages, root on an even page: a root at an odd one would make KVM-PVM's native mode
 * run the 32-bit code natively, docs/pvm.md), loads the fixture's `gdtr` and enters 64-bit
 * mode at the fixture's `long_start`; LOAD (every GPR but rsp from a seed) and DUMP; and
 * `dump`, which prints "D<n as 16 hex digits>", every GPR and RFLAGS as they were at the
 * DUMP on COM1 and preserves them all.
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
	ljmp $CODE64, $long_start

	.text
	.code64
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
	cld
	movb $'D', %al
	call putc
	movq 136(%rsp), %rax          /* n: above the return address */
	call puthex
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
	call putc
	popq %rax
	decl %ecx
	jnz 4b
	ret

/* QEMU's and previrt's UARTs take a byte at any time: no line-status polling. */
putc:
	pushq %rdx
	movw $COM1, %dx
	outb %al, %dx
	popq %rdx
	ret

	.section .rodata
hexdigits:
	.ascii "0123456789abcdef"

	.bss
	.balign 8192
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096

	.text

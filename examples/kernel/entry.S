/*
 * 64-bit entry points: kernel_entry64 (the documented long-mode entry, see README.md), the
 * interrupt and exception stubs, and the few helpers that need exact instruction control.
 */
	.text
	.code64

/*
 * kernel_entry64: long mode, interrupts off, the image identity-mapped, %rdi = struct
 * boot_info * or 0. No stack is needed: the kernel switches to its own at once. The loader
 * must have zeroed .bss (every ELF loader does: p_memsz beyond p_filesz).
 */
	.globl kernel_entry64
	.type kernel_entry64, @function
kernel_entry64:
	cli
	cld
	movq $boot_stack_top, %rsp
	xorl %ebp, %ebp
	call kernel_main
1:	cli
	hlt
	jmp 1b
	.size kernel_entry64, . - kernel_entry64

/* void load_segments(u64 cs, u64 ds): reload CS with a far return, then the data segments. */
	.globl load_segments
	.type load_segments, @function
load_segments:
	movl %esi, %ds
	movl %esi, %es
	movl %esi, %ss
	movl %esi, %fs
	movl %esi, %gs
	popq %rax			/* our return address becomes the far-return target */
	pushq %rdi
	pushq %rax
	lretq
	.size load_segments, . - load_segments

/*
 * bool probe_read(const volatile u64 *addr, u64 *val): the page-fault handler resumes a fault
 * at probe_read_insn at probe_read_fixup (a one-entry exception table).
 */
	.globl probe_read, probe_read_insn, probe_read_fixup
	.type probe_read, @function
probe_read:
probe_read_insn:
	movq (%rdi), %rax
	movq %rax, (%rsi)
	movl $1, %eax
	ret
probe_read_fixup:
	xorl %eax, %eax
	ret
	.size probe_read, . - probe_read

/*
 * One stub per vector: push a zero where the CPU pushes no error code, push the vector,
 * then save every general register and call interrupt_dispatch(struct irq_frame *).
 */
.macro vector_stub n
	.balign 16
vector_\n:
	.if !((\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
	pushq $0
	.endif
	pushq $\n
	jmp interrupt_common
.endm

	.balign 16
	.globl vector_stubs_start
vector_stubs_start:
	.altmacro
	.set i, 0
	.rept 256
	vector_stub %i
	.set i, i + 1
	.endr
	.noaltmacro

	.globl vector_stub_table
	.section .rodata
	.balign 8
vector_stub_table:
	.macro stub_address n
	.quad vector_\n
	.endm
	.altmacro
	.set i, 0
	.rept 256
	stub_address %i
	.set i, i + 1
	.endr
	.noaltmacro

	.text
interrupt_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi
	call interrupt_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp			/* vector and error code */
	iretq

	.section .bss..page_aligned, "aw", @nobits
	.balign 4096
	.globl boot_stack_top, ist_stack_top
	.skip 16384
boot_stack_top:
	.skip 4096
ist_stack_top:

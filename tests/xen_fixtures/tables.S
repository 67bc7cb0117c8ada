/*
 * Xen PV fixture for tests/xen_pv.rs: a kernel that loads its own GDT and IDT and reads them
 * back. Under Xen PV the CPU holds Xen's tables (the runtime's GDT frames in Xen's per-vCPU
 * area, Xen's IDT), so `sgdt`/`sidt` must be sites the runtime answers with the kernel's; the
 * GDT's own memory must be as the kernel wrote it (the runtime's copy holds DPL 3
 * descriptors). Then it loads %ds with one of its selectors and reads it back. Verdict through
 * isa-debug-exit: 0 when everything matches, else the number of the first check that failed.
 */
#include "pvh-stub.h"

	.text
	.code64
	.globl kernel_entry64
kernel_entry64:
	lgdt gdt_desc(%rip)
	lidt idt_desc(%rip)
	sgdt stored(%rip)
	sidt stored + 16(%rip)
	movl $1, %eax
	movq gdt_desc + 2(%rip), %rcx
	cmpq %rcx, stored + 2(%rip)
	jne 9f
	movw gdt_desc(%rip), %cx
	cmpw %cx, stored(%rip)
	jne 9f
	movl $2, %eax
	movq idt_desc + 2(%rip), %rcx
	cmpq %rcx, stored + 18(%rip)
	jne 9f
	movw idt_desc(%rip), %cx
	cmpw %cx, stored + 16(%rip)
	jne 9f
	movl $3, %eax			/* the GDT's memory: DPL 0 as written */
	movq $0x00cf93000000ffff, %rcx
	cmpq %rcx, gdt + 16(%rip)
	jne 9f
	movl $4, %eax			/* %ds reads back the kernel's selector, RPL 0 */
	movl $0x10, %ecx
	movl %ecx, %ds
	movl %ds, %ecx
	cmpl $0x10, %ecx
	jne 9f
	xorl %eax, %eax
9:	outb %al, $0xf4
	ud2

	.balign 16
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08 64-bit code, DPL 0 */
	.quad 0x00cf93000000ffff	/* 0x10 data, DPL 0 */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt
	.balign 16
idt:
	.fill 32, 16, 0			/* no gates: nothing is delivered */
idt_end:
idt_desc:
	.word idt_end - idt - 1
	.quad idt
	.balign 16
stored:
	.fill 32, 1, 0xcc

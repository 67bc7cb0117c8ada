/*
 * Xen PV fixture for tests/xen_pv.rs: a kernel whose GDT holds a descriptor Xen refuses from a
 * PV guest. Entry 1 (selector 0x8) is a present LDT descriptor; under Xen PV the runtime
 * translates the table into its GDT frames with update_descriptor, Xen answers -EINVAL for
 * that entry, and the runtime must name the entry, the hypercall, its arguments and the error,
 * then crash the domain (no hang). The PVH entry only exists because previrt link needs one.
 */
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
1:	hlt
	jmp 1b

	.text
	.code64
	.globl kernel_entry64
kernel_entry64:
	lgdt gdt_desc(%rip)
	ud2

	.balign 16
gdt:
	.quad 0
	.quad 0x00008200000000ff	/* present LDT descriptor, base 0, limit 0xff */
	.quad 0				/* its upper half: base 63..32 */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

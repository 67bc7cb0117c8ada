/*
 * Xen PV fixture for tests/xen_pv.rs: a kernel whose GDT holds a descriptor Xen refuses from a
 * PV guest. Entry 1 (selector 0x8) is a present LDT descriptor; under Xen PV the runtime
 * translates the table into its GDT frames with update_descriptor, Xen answers -EINVAL for
 * that entry, and the runtime must name the entry, the hypercall, its arguments and the error,
 * then crash the domain (no hang).
 */
#include "pvh-stub.h"

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

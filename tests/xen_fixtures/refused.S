/*
 * Xen PV fixture for tests/xen_pv.rs: a kernel whose first sensitive instruction asks Xen for
 * something it refuses. kernel_entry64 writes a non-canonical IA32_KERNEL_GS_BASE; under Xen
 * PV the runtime turns that into set_segment_base, Xen answers -EINVAL, and the runtime must
 * name the hypercall, its arguments and the error, then crash the domain (no hang).
 */
#include "pvh-stub.h"

	.text
	.code64
	.globl kernel_entry64
kernel_entry64:
	movl $0xc0000102, %ecx
	xorl %eax, %eax
	movl $0x80000000, %edx
	wrmsr
	ud2

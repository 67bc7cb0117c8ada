/*
 * The reference tiny PV kernel for bench/xen.sh: no runtime, no site, only what a 64-bit PV
 * dom0 needs to say one line and stop. Its boot-to-verdict time is the floor Xen itself
 * imposes on any dom0 (docs/xen-pv.md, "Measurements"); the pre-virtualized kernel's time is
 * reported next to it. Built with `gcc -c` and `ld -T tiny-pv.ld`.
 *
 * Xen enters `start` in ring 3 with %rsi = start_info. It prints "RESULT PASS" with
 * console_io(CONSOLEIO_write), asks for virtual IOPL 1 (PHYSDEVOP_set_iopl) so that the
 * isa-debug-exit write reaches QEMU, writes 0 there, and shuts down if that returns.
 */
#define HYPERCALL(nr) (hypercall_page + (nr) * 32)
#define __HYPERVISOR_console_io 18
#define __HYPERVISOR_sched_op 29
#define __HYPERVISOR_physdev_op 33

	.macro note type, desc_start, desc_end
	.balign 4
	.long 4, \desc_end - \desc_start, \type
	.asciz "Xen"
	.balign 4
	.endm

	.section .note.Xen, "a"
	note 5, 1f, 2f		/* XEN_VERSION */
1:	.asciz "xen-3.0"
2:	note 8, 1f, 2f		/* LOADER */
1:	.asciz "generic"
2:	note 9, 1f, 2f		/* PAE_MODE */
1:	.asciz "yes"
2:	note 1, 1f, 2f		/* ENTRY */
1:	.quad start
2:	note 2, 1f, 2f		/* HYPERCALL_PAGE */
1:	.quad hypercall_page
2:	note 3, 1f, 2f		/* VIRT_BASE */
1:	.quad 0
2:	note 4, 1f, 2f		/* PADDR_OFFSET */
1:	.quad 0
2:

	.text
	.globl start
start:
	leaq stack_top(%rip), %rsp
	movl $0, %edi			/* CONSOLEIO_write */
	movl $msg_end - msg, %esi
	leaq msg(%rip), %rdx
	call HYPERCALL(__HYPERVISOR_console_io)
	movl $6, %edi			/* PHYSDEVOP_set_iopl */
	leaq iopl(%rip), %rsi
	call HYPERCALL(__HYPERVISOR_physdev_op)
	xorl %eax, %eax
	outb %al, $0xf4
	movl $2, %edi			/* SCHEDOP_shutdown */
	leaq poweroff(%rip), %rsi
	call HYPERCALL(__HYPERVISOR_sched_op)
	ud2

	.data
msg:	.ascii "RESULT PASS\n"
msg_end:
	.balign 4
iopl:	.long 1
poweroff: .long 0

	.bss
	.balign 4096
hypercall_page: .skip 4096
	.skip 4096
stack_top:

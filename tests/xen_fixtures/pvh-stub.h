/*
 * The PVH entry every refusal fixture carries only because previrt link needs one (the note
 * QEMU reads, and a 32-bit entry that halts). #included by refused*.S.
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

/*
 * The 32-bit boot paths. Both the PVH entry (Xen/x86 HVM direct boot ABI: protected mode,
 * paging off, %ebx = hvm_start_info) and the multiboot v1 entry (%eax = 0x2badb002,
 * %ebx = multiboot_info) record where the command line is in boot_info, switch to long mode
 * on boot page tables that identity-map the first 1 GiB with 2 MiB pages, and then enter
 * kernel_entry64 exactly as an external 64-bit loader would.
 *
 * This file is the only 32-bit code in the kernel; it lives in .head32.text so that tools
 * can tell it apart from the 64-bit .text.
 */
#include "boot.h"

	.section .note.Xen, "a", @note
	.balign 4
	.long 2f - 1f
	.long 4f - 3f
	.long XEN_ELFNOTE_PHYS32_ENTRY
1:	.asciz "Xen"
2:	.balign 4
3:	.quad pvh_start32
4:	.balign 4

	.section .head32.text, "ax"
	.code32

	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl $BOOT_SOURCE_PVH, %ecx
	xorl %edx, %edx
	cmpl $PVH_START_MAGIC, (%ebx)
	jne common32
	movl PVH_CMDLINE_OFFSET(%ebx), %edx	/* PVH loaders keep it below 4 GiB */
	jmp common32

	.globl multiboot_start32
multiboot_start32:
	cli
	cld
	movl $BOOT_SOURCE_MULTIBOOT, %ecx
	xorl %edx, %edx
	cmpl $MULTIBOOT_BOOTLOADER_MAGIC, %eax
	jne common32
	testl $MULTIBOOT_INFO_CMDLINE, (%ebx)
	jz common32
	movl MULTIBOOT_CMDLINE_OFFSET(%ebx), %edx

common32:
	movl $BOOT_INFO_MAGIC, boot_info + BI_MAGIC
	movl $BOOT_INFO_VERSION, boot_info + BI_VERSION
	movl %edx, boot_info + BI_CMDLINE
	movl $0, boot_info + BI_CMDLINE + 4
	movl %ecx, boot_info + BI_SOURCE

	/* Neither protocol promises a usable GDT: load ours before touching segments. */
	lgdt boot_gdt_desc
	ljmp $BOOT_CS32, $1f
1:	movl $BOOT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss

	/* Boot page tables: PML4[0] -> PDPT[0] -> PD with 512 2 MiB pages (first 1 GiB). */
	movl $boot_pml4, %edi
	movl $(3 * 4096 / 4), %ecx
	xorl %eax, %eax
	rep stosl
	movl $(boot_pdpt + 0x3), boot_pml4
	movl $(boot_pd + 0x3), boot_pdpt
	movl $boot_pd, %edi
	movl $0x83, %eax			/* present | writable | 2 MiB page */
2:	movl %eax, (%edi)
	addl $8, %edi
	addl $0x200000, %eax
	cmpl $(boot_pd + 4096), %edi
	jne 2b

	movl %cr4, %eax
	orl $(1 << 5), %eax			/* PAE */
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx			/* EFER */
	rdmsr
	orl $(1 << 8), %eax			/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax			/* PG | PE */
	movl %eax, %cr0
	ljmp $BOOT_CS64, $start64_from32

	/* 64-bit code from here on: it belongs in .text, not in the 32-bit section. */
	.text
	.code64
start64_from32:
	movl $BOOT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq $boot_info, %rdi
	jmp kernel_entry64

	.section .rodata
	.balign 8
boot_gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* BOOT_CS32: 32-bit flat code */
	.quad 0x00af9b000000ffff	/* BOOT_CS64: 64-bit code */
	.quad 0x00cf93000000ffff	/* BOOT_DS: flat data */
boot_gdt_end:
boot_gdt_desc:
	.word boot_gdt_end - boot_gdt - 1
	.long boot_gdt

	.data
	.balign 8
	.globl boot_info
boot_info:
	.fill BI_SIZE, 1, 0

	/* Outside the kernel's .bss on purpose: in use before the kernel owns memory. */
	.section .bss..boot, "aw", @nobits
	.balign 4096
boot_pml4:
	.skip 4096
boot_pdpt:
	.skip 4096
boot_pd:
	.skip 4096

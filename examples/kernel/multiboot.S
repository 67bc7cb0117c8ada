/*
 * Multiboot v1 header. Multiboot loaders (QEMU's -kernel among them) refuse ELF64 images
 * unless the header carries explicit load addresses (flag bit 16), so it does; kernel.ld
 * keeps the image one contiguous file-backed range followed by .bss, which those fields
 * describe. Kept in its own object so a PVH-only image can be linked without it.
 */
#include "boot.h"

	.section .multiboot, "a"
	.balign 4
multiboot_header:
	.long MULTIBOOT_HEADER_MAGIC
	.long MULTIBOOT_HEADER_FLAGS
	.long -(MULTIBOOT_HEADER_MAGIC + MULTIBOOT_HEADER_FLAGS)
	.long multiboot_header		/* header_addr */
	.long __image_start		/* load_addr */
	.long __data_end		/* load_end_addr */
	.long __image_end		/* bss_end_addr */
	.long multiboot_start32		/* entry_addr */

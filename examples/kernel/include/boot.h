/*
 * The boot-info structure kernel_entry64 receives in %rdi (documented in README.md), and the
 * constants of the two 32-bit boot protocols. Shared by assembly and C.
 */
#ifndef BOOT_H
#define BOOT_H

#define BOOT_INFO_MAGIC 0x49424b58 /* "XKBI" little-endian */
#define BOOT_INFO_VERSION 1

/* struct boot_info field offsets */
#define BI_MAGIC 0
#define BI_VERSION 4
#define BI_CMDLINE 8
#define BI_SOURCE 16
#define BI_SIZE 24

/* How the kernel was entered; a 64-bit loader that calls kernel_entry64 passes 0. */
#define BOOT_SOURCE_ENTRY64 0
#define BOOT_SOURCE_PVH 1
#define BOOT_SOURCE_MULTIBOOT 2

#define PVH_START_MAGIC 0x336ec578 /* hvm_start_info.magic */
#define PVH_CMDLINE_OFFSET 24 /* hvm_start_info.cmdline_paddr */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define MULTIBOOT_HEADER_MAGIC 0x1badb002
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2badb002
/* Only the a.out-kludge address fields (needed for ELF64); no modules or memory map used. */
#define MULTIBOOT_HEADER_FLAGS 0x00010000
#define MULTIBOOT_INFO_CMDLINE (1 << 2)
#define MULTIBOOT_CMDLINE_OFFSET 16

/* Boot GDT selectors, laid out like the kernel's own (and Linux's) GDT. */
#define BOOT_CS32 0x08
#define BOOT_CS64 0x10
#define BOOT_DS 0x18

#ifndef __ASSEMBLY__
#include "types.h"

struct boot_info {
	u32 magic;
	u32 version;
	u64 cmdline_paddr;
	u32 boot_source;
	u32 reserved;
};
_Static_assert(sizeof(struct boot_info) == BI_SIZE, "boot_info layout");
_Static_assert(__builtin_offsetof(struct boot_info, cmdline_paddr) == BI_CMDLINE, "boot_info");
_Static_assert(__builtin_offsetof(struct boot_info, boot_source) == BI_SOURCE, "boot_info");
#endif

#endif

/*
 * A kernel that changes an intermediate page-table entry under a live address space, for
 * tests/pvm_tables.rs: a PD entry of the region at 1 GiB first points at page table A (4 KiB
 * pages tagged 0xa0..0xa3) and the first page is read, then at table B (0xb0..0xb3) with one
 * `invlpg` of that page (the SDM: it also drops every paging-structure cache entry, and the
 * other three pages were never read, so no TLB entry of theirs is stale: all four read B's
 * tags); then the same entry loses its R/W bit and the kernel `invlpg`s every page of the
 * region before writing one of them (a #PF on the CPU, CR0.WP set). Each
 * step dumps the tags it reads ("D<case> ...", as the other fixtures). Under QEMU TCG with
 * previrt.backend=native (the real instructions) and under `previrt run --backend native`
 * with previrt.backend=pvm the dumps must be equal: the pvm backend's copy must follow the
 * entry's new table and flags, and flush what it copied from the old ones.
 */
#define CODE64 0x10
#include "dump.h"
#include "pvm_tables.h"

	.set REGION, 0x40000000

/* Case \n: the first word of the region's four pages into rax, rbx, rcx, rdx; dump. */
.macro READ4 n
	LOAD \n
	movq REGION, %rax
	movq REGION + 0x1000, %rbx
	movq REGION + 0x2000, %rcx
	movq REGION + 0x3000, %rdx
	DUMP \n
.endm

long_start:
	START
	/* Supervisor writes honour read-only pages (as every real kernel runs). */
	movq %cr0, %rax
	orq $0x10000, %rax
	movq %rax, %cr0
	GATE 14, pf_dump, 0x8e
	/* Tags, and tables A and B mapping the region's first four pages to their frames. */
	xorl %ecx, %ecx
1:	movq %rcx, %rax
	shlq $12, %rax
	leaq 0xa0(%rcx), %rdx
	movq %rdx, frames_a(%rax)
	leaq 0xb0(%rcx), %rdx
	movq %rdx, frames_b(%rax)
	leaq frames_a + 3(%rax), %rdx
	movq %rdx, pt_a(, %rcx, 8)
	leaq frames_b + 3(%rax), %rdx
	movq %rdx, pt_b(, %rcx, 8)
	incl %ecx
	cmpl $4, %ecx
	jb 1b
	/* The region's PD (new, under a PDPT entry that was not present) points at A. */
	movq $pt_a + 3, pd_region
	movq $pd_region + 3, pdpt + 8
	invlpg REGION
	LOAD 0x10
	movq REGION, %rax
	DUMP 0x10
	/* Only REGION was read: retarget the PD entry to B and invlpg that one page. */
	movq $pt_b + 3, pd_region
	invlpg REGION
	READ4 0x11
	/* Read-only at the PD level; every page of the region invalidated; a write faults. */
	movq $pt_b + 1, pd_region
	invlpg REGION
	invlpg REGION + 0x1000
	invlpg REGION + 0x2000
	invlpg REGION + 0x3000
	READ4 0x12
	LOAD 0x13
	leaq 2f(%rip), %r15
	movq %rax, REGION + 0x2000
2:	DUMP 0x13
	EXIT 0

	LINUX_GDT

	.bss
	.balign 4096
pd_region:	.skip 4096
pt_a:	.skip 4096
pt_b:	.skip 4096
frames_a:	.skip 4 * 4096
frames_b:	.skip 4 * 4096

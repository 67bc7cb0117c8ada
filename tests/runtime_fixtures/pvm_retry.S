/*
 * Page-table changes a kernel makes without `invlpg` (tests/pvm_tables.rs), as Linux does:
 * x86 caches no translation through a not-present entry, so mapping a page where nothing was,
 * or linking a new page table (or page directory) under a not-present entry, needs no flush;
 * and a permission made wider (read-only to writable) needs none either, at the price of a
 * rare spurious #PF, which the #PF handler retries when its own tables allow the access.
 * The region at 2 GiB (`base`) has a PD and a PT from the start, with one page of `pattern`
 * read-only; the one at 3 GiB (`far`) has no PD. With known flags and GPRs each case makes
 * its change and at once accesses through it (no site in between: a site could sync the pvm
 * backend's copy), then dumps ("D<case> ...", as pvm_lean.S) what it read and what landed in
 * memory. Last, real faults the kernel's handler must get (`pf_dump`: CR2 and the error code):
 * a read where no PD is, a read where the PT entry is not present, a write to a read-only
 * page. Under QEMU TCG with previrt.backend=native (the real instructions) and under
 * `previrt run --backend native` with previrt.backend=pvm the dumps must be equal; the pvm
 * backend, whose copy of the tables is older than each change, must resolve the faults the
 * changes raise (faults-resolved) and hand the kernel only the real ones.
 */
#define CODE64 0x10
#include "dump.h"
#include "pvm_tables.h"

	.set base, 0x80000000
	.set far, 0xc0000000

/* A 4 KiB page mapped at `base` (PT entry 0 was not present): rbx written through it, read
 * back through it into rdx and through the identity map into rcx. */
.macro MAP_PAGE
	movq $page + 3, pt_base
	movl $base, %edi
	movq %rbx, (%rdi)
	movq (%rdi), %rdx
	movq page, %rcx
.endm

/* A new PT (mapping `pattern` at its entry 8) linked at PD entry 1 of `base`, which was not
 * present; its second word read into rdx. */
.macro NEW_PT
	movq $pattern + 1, pt_new + 8 * 8
	movq $pt_new + 3, pd_base + 8
	movl $base + 0x200000 + 8 * 0x1000, %edi
	movq 8(%rdi), %rdx
.endm

/* A new PD (entry 3: a new PT mapping `pattern` at its entry 5) linked at PDPT entry 3,
 * which was not present; the third word read into rdx. */
.macro NEW_PD
	movq $pattern + 1, pt_far + 5 * 8
	movq $pt_far + 3, pd_far + 3 * 8
	movq $pd_far + 3, pdpt + 3 * 8
	movl $far + 3 * 0x200000 + 5 * 0x1000, %edi
	movq 16(%rdi), %rdx
.endm

/* `pattern` at PT entry 2, read-only: its fourth word read into rdx (the translation may
 * now be cached), the entry made writable, rbx written there, read back through the
 * identity map into rcx. */
.macro MAKE_WRITABLE
	movl $base + 2 * 0x1000, %edi
	movq 24(%rdi), %rdx
	orq $2, pt_base + 2 * 8
	movq %rbx, 24(%rdi)
	movq pattern + 24, %rcx
.endm

long_start:
	/* Before the first CR3 load, which the pvm backend builds its copy from: `base` has a
	 * PD and a PT, `pattern` read-only at PT entries 2 and 4. Entry 2 has A set already:
	 * the CPU sets it at the first read, the pvm backend in its copy only (docs/pvm.md),
	 * and MAKE_WRITABLE's flags depend on it. */
	movq $pd_base + 3, pdpt + 2 * 8
	movq $pt_base + 3, pd_base
	movq $pattern + 0x21, pt_base + 2 * 8
	movq $pattern + 1, pt_base + 4 * 8
	START
	GATE 14, pf_retry, 0x8e
	/* Ring 0 writes obey read-only pages (CR0.WP), as in Linux: without it the CPU lets the
	 * kernel write them, which the pvm backend, running it natively in ring 3, cannot. */
	movq %cr0, %rax
	orq $0x10000, %rax
	movq %rax, %cr0

	CASE 0x10, 0, MAP_PAGE
	CASE 0x11, 1, NEW_PT
	CASE 0x12, 0, NEW_PD
	CASE 0x13, 1, MAKE_WRITABLE

	/* Off %rdi = `unmapped` (1 GiB): there, then `base`'s pages 3 and 4. */
	FAULT 0x400, movq (%rdi), %rax
	FAULT 0x401, movq base - unmapped + 3 * 0x1000(%rdi), %rax
	FAULT 0x402, movq %rax, base - unmapped + 4 * 0x1000(%rdi)

	EXIT 0

/* #PF: a fault this kernel's own tables allow (a CPU may raise one through a translation it
 * held from before a change made without `invlpg`) is retried, as an OS does; a second one at
 * the same address, which no CPU raises (a #PF drops the address's translations), goes to
 * `unexpected` instead of looping. Any other fault goes to `pf_dump`. */
pf_retry:
	pushq %rax
	pushq %rcx
	pushq %rdx
	movq %cr2, %rdx
	movq $pml4, %rax
	movl $39, %ecx
	/* Walk from the root: rax the table, cl the shift of this level's index. */
1:	pushq %rdx
	shrq %cl, %rdx
	andl $511, %edx
	movq (%rax, %rdx, 8), %rax
	popq %rdx
	testb $1, %al
	jz 3f
	testb $2, 24(%rsp)              /* the error code's W bit */
	jz 2f
	testb $2, %al
	jz 3f
2:	cmpb $12, %cl
	je 4f
	testb $0x80, %al                /* a large page */
	jnz 4f
	andq $~0xfff, %rax              /* no NX or high bits in these tables */
	subb $9, %cl
	jmp 1b
4:	cmpq %rdx, last_spurious
	je unexpected
	movq %rdx, last_spurious
	popq %rdx
	popq %rcx
	popq %rax
	addq $8, %rsp
	iretq
3:	popq %rdx
	popq %rcx
	popq %rax
	jmp pf_dump

	LINUX_GDT
	.data
last_spurious:
	.quad 0
	.balign 4096
pattern:
	.quad 0x1111aaaa2222bbbb, 0x3333cccc4444dddd, 0x5555eeee6666ffff, 0x7777000088881111

	.bss
	.balign 4096
pd_base:	.skip 4096
pt_base:	.skip 4096
pt_new:	.skip 4096
pd_far:	.skip 4096
pt_far:	.skip 4096
page:	.skip 4096

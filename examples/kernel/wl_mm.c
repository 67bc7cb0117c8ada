/* Memory-management workloads: page-table churn, and a deliberate fault. */
#include "kernel.h"
#include "mm.h"
#include "x86.h"

#define SCRATCH_VA 0x0000008000000000UL /* PML4 slot 1: nothing else lives there */
#define UNMAPPED_VA 0x0000010000000000UL /* PML4 slot 2: never mapped */
#define SCRATCH_PAGES 16
#define ALIAS_PAGE SCRATCH_PAGES /* two extra virtual pages that alias one frame */
#define ROUNDS 8
#define TAG_WORD 0
#define DATA_WORD 1
#define ALIAS_WORD 2

static u64 frames[SCRATCH_PAGES][PAGE_SIZE / 8]
	__attribute__((aligned(PAGE_SIZE), section(".bss..page_aligned")));
/* Two address spaces sharing the kernel's mappings, differing in the scratch slot. */
static pte_t *spaces[2];

static u64 *va(unsigned page) { return (u64 *)(SCRATCH_VA + page * PAGE_SIZE); }
static u64 frame_pa(unsigned f) { return (u64)frames[f % SCRATCH_PAGES]; }
static u64 frame_tag(unsigned f) { return 0x5ca1ab1e00000000UL | (f % SCRATCH_PAGES); }

/* Frame that page i shows in space s during round r. */
static unsigned frame_of(unsigned s, unsigned i, unsigned r)
{
	return s == 0 ? i + r : SCRATCH_PAGES - 1 - i + r;
}

static const char *check_view(unsigned s, unsigned r, u64 *h)
{
	for (unsigned i = 0; i < SCRATCH_PAGES; i++) {
		u64 v = READ_ONCE(va(i)[TAG_WORD]);
		if (v != frame_tag(frame_of(s, i, r)))
			return "a page shows the wrong frame";
		*h = csum_add(*h, v);
	}
	return NULL;
}

static const char *round_checks(unsigned r, u64 *h)
{
	const char *why;
	/* Map both spaces; space 0 is live, so replaced entries need invlpg. */
	for (unsigned i = 0; i < SCRATCH_PAGES; i++) {
		for (unsigned s = 0; s < 2; s++)
			map_page(spaces[s], (u64)va(i), frame_pa(frame_of(s, i, r)), PTE_WRITE);
		invlpg((u64)va(i));
	}
	if ((why = check_view(0, r, h)))
		return why;

	/* Stores through a mapping land in the frame, seen through the identity map. */
	for (unsigned i = 0; i < SCRATCH_PAGES; i++) {
		u64 v = (u64)r * SCRATCH_PAGES + i;
		WRITE_ONCE(va(i)[DATA_WORD], v);
		if (READ_ONCE(frames[frame_of(0, i, r) % SCRATCH_PAGES][DATA_WORD]) != v)
			return "a store through a mapping did not reach its frame";
	}

	/* Two virtual pages aliasing one frame. */
	for (unsigned a = 0; a < 2; a++) {
		map_page(spaces[0], (u64)va(ALIAS_PAGE + a), frame_pa(r), PTE_WRITE);
		invlpg((u64)va(ALIAS_PAGE + a));
	}
	u64 marker = 0xa11a5000UL + r;
	WRITE_ONCE(va(ALIAS_PAGE)[ALIAS_WORD], marker);
	if (READ_ONCE(va(ALIAS_PAGE + 1)[ALIAS_WORD]) != marker)
		return "aliased pages disagree";
	*h = csum_add(*h, marker);

	/* Unmapped pages fault (recovered via probe_read), mapped ones do not. */
	for (unsigned i = 1; i < SCRATCH_PAGES; i += 2)
		unmap_page(spaces[0], (u64)va(i));
	for (unsigned i = 0; i < SCRATCH_PAGES; i++) {
		u64 v = 0;
		bool mapped = probe_read(va(i), &v);
		if (mapped != (i % 2 == 0))
			return mapped ? "an unmapped page is still readable" : "a mapped page faulted";
		if (!mapped && last_fault_addr != (u64)va(i))
			return "the page fault reported the wrong address";
		*h = csum_add(*h, mapped ? v : 0xfa17UL);
	}

	/* Retarget present entries without invlpg; a CR3 reload must flush them. */
	for (unsigned i = 0; i < SCRATCH_PAGES; i += 2)
		map_page(spaces[0], (u64)va(i), frame_pa(i + r + 1), PTE_WRITE);
	write_cr3(read_cr3());
	for (unsigned i = 0; i < SCRATCH_PAGES; i += 2) {
		u64 v = READ_ONCE(va(i)[TAG_WORD]);
		if (v != frame_tag(i + r + 1))
			return "a CR3 reload did not flush a changed mapping";
		*h = csum_add(*h, v);
	}

	/* The other address space has its own view, and switching back restores ours. */
	switch_pml4(spaces[1]);
	why = check_view(1, r, h);
	switch_pml4(spaces[0]);
	if (!why && READ_ONCE(va(0)[TAG_WORD]) != frame_tag(r + 1))
		why = "switching address spaces lost a mapping";
	return why;
}

const char *wl_pagetable(u64 *checksum)
{
	if (!spaces[0]) {
		spaces[0] = pml4_clone_kernel();
		spaces[1] = pml4_clone_kernel();
	}
	for (unsigned f = 0; f < SCRATCH_PAGES; f++) {
		frames[f][TAG_WORD] = frame_tag(f);
		frames[f][DATA_WORD] = 0;
	}
	u64 h = CSUM_INIT;
	const char *why = NULL;
	switch_pml4(spaces[0]);
	for (unsigned r = 0; r < ROUNDS && !why; r++)
		why = round_checks(r, &h);
	switch_pml4(kernel_pml4);
	/* Leave the scratch slot empty so the next repeat starts from the same state. */
	for (unsigned s = 0; s < 2; s++)
		for (unsigned i = 0; i < ALIAS_PAGE + 2; i++)
			unmap_page(spaces[s], (u64)va(i));
	*checksum = h;
	return why;
}

/* Not in the default list: proves the exception path by reading an address never mapped. */
const char *wl_fault(u64 *checksum)
{
	*checksum = READ_ONCE(*(volatile u64 *)UNMAPPED_VA);
	return "reading an unmapped address did not fault";
}

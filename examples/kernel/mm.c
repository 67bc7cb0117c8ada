/* The kernel's own 4-level page tables, built at run time from a pool inside the image. */
#include "kernel.h"
#include "mm.h"
#include "x86.h"

#define PT_POOL_PAGES 32
#define LEVELS 4

extern char __image_start[], __image_end[];

static pte_t pt_pool[PT_POOL_PAGES][PTES_PER_TABLE]
	__attribute__((aligned(PAGE_SIZE), section(".bss..page_aligned")));
static unsigned pt_pool_used;
pte_t *kernel_pml4;

static pte_t *pt_alloc(void)
{
	if (pt_pool_used == PT_POOL_PAGES) {
		con_write("FATAL page-table pool exhausted\nRESULT FAIL\n");
		machine_exit(false);
	}
	pte_t *t = pt_pool[pt_pool_used++];
	for (unsigned i = 0; i < PTES_PER_TABLE; i++)
		set_pte(&t[i], (pte_t){ 0 });
	return t;
}

static unsigned pt_index(u64 va, unsigned level)
{
	return (va >> (12 + 9 * level)) & (PTES_PER_TABLE - 1);
}

/* The leaf entry for va, creating missing intermediate tables when asked. */
static pte_t *walk(pte_t *pml4, u64 va, bool create)
{
	pte_t *table = pml4;
	for (unsigned level = LEVELS - 1; level > 0; level--) {
		pte_t *e = &table[pt_index(va, level)];
		pte_t v = get_pte(e);
		if (!(v.pte & PTE_PRESENT)) {
			if (!create)
				return NULL;
			table = pt_alloc();
			set_pte(e, make_pte((u64)table, PTE_PRESENT | PTE_WRITE));
		} else {
			table = (pte_t *)(v.pte & PTE_ADDR_MASK);
		}
	}
	return &table[pt_index(va, 0)];
}

void map_page(pte_t *pml4, u64 va, u64 pa, u64 flags)
{
	set_pte(walk(pml4, va, true), make_pte(pa, flags | PTE_PRESENT));
}

void unmap_page(pte_t *pml4, u64 va)
{
	pte_t *e = walk(pml4, va, false);
	if (e)
		set_pte(e, (pte_t){ 0 });
	invlpg(va);
}

pte_t *pml4_clone_kernel(void)
{
	pte_t *t = pt_alloc();
	for (unsigned i = 0; i < PTES_PER_TABLE; i++)
		set_pte(&t[i], get_pte(&kernel_pml4[i]));
	return t;
}

void switch_pml4(pte_t *pml4)
{
	write_cr3((u64)pml4);
}

volatile void *ioremap_uc(u64 pa)
{
	map_page(kernel_pml4, pa & ~(PAGE_SIZE - 1), pa & ~(PAGE_SIZE - 1),
		 PTE_WRITE | PTE_PCD | PTE_PWT);
	return (volatile void *)pa;
}

void paging_init(void)
{
	bool pge = cpuid(1).edx & (1 << 13);
	u64 flags = PTE_WRITE | (pge ? PTE_GLOBAL : 0);
	kernel_pml4 = pt_alloc();
#ifdef PML4_ODD_PAGE
	/* Build option: the root table on a page whose address has bit 12 set, a placement
	 * some hypervisors treat specially (a root that ends up there must still work). */
	if (!((u64)kernel_pml4 & PAGE_SIZE))
		kernel_pml4 = pt_alloc();
#endif
	/* Only the image: everything the kernel touches lives in it, so loaders need map nothing else. */
	for (u64 pa = (u64)__image_start; pa < ALIGN_UP((u64)__image_end, PAGE_SIZE); pa += PAGE_SIZE)
		map_page(kernel_pml4, pa, pa, flags);
	switch_pml4(kernel_pml4);
	write_cr0(read_cr0() | X86_CR0_WP);
	if (pge)
		write_cr4(read_cr4() | X86_CR4_PGE);
}

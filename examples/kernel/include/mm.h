/* 4-level x86-64 page tables. Entries are read and written only through get_pte/set_pte. */
#ifndef MM_H
#define MM_H

#include "types.h"

typedef struct {
	u64 pte;
} pte_t;

#define PTE_PRESENT (1UL << 0)
#define PTE_WRITE (1UL << 1)
#define PTE_PWT (1UL << 3)
#define PTE_PCD (1UL << 4)
#define PTE_GLOBAL (1UL << 8)
#define PTE_ADDR_MASK 0x000ffffffffff000UL
#define PTES_PER_TABLE 512

static inline pte_t get_pte(const pte_t *ptep) { return (pte_t){ READ_ONCE(ptep->pte) }; }
static inline void set_pte(pte_t *ptep, pte_t v) { WRITE_ONCE(ptep->pte, v.pte); }
static inline pte_t make_pte(u64 pa, u64 flags) { return (pte_t){ (pa & PTE_ADDR_MASK) | flags }; }

/* The kernel's address space: its image identity-mapped, nothing else until asked for. */
extern pte_t *kernel_pml4;

void paging_init(void);
/* A new top-level table sharing every kernel mapping of kernel_pml4. */
pte_t *pml4_clone_kernel(void);
void map_page(pte_t *pml4, u64 va, u64 pa, u64 flags);
void unmap_page(pte_t *pml4, u64 va);
/* Identity-maps a device page uncacheable (PCD|PWT) in the kernel address space. */
volatile void *ioremap_uc(u64 pa);
void switch_pml4(pte_t *pml4);

#endif

//! The boot paths (docs/runtime-entry.md): PVH, multiboot v1 and a 64-bit ELF entry.
//!
//! `previrt_pvh_entry` is the kernel's PVH entry after `previrt link`: it is entered in 32-bit
//! protected mode, paging off, `%ebx` = hvm_start_info. It builds its own page tables
//! (identity map of the low 4 GiB with 2 MiB pages, plus the kernel's virtual window when the
//! kernel is linked at virt != phys), enters long mode, calls [`super::boot`] at its virtual
//! address, then goes back to 32-bit protected mode with paging off and the original CR0, CR4
//! and EFER, and jumps to the kernel's original PVH entry with the original `%ebx` (and
//! `%esp` at the top of the runtime's boot stack). So any PVH kernel works unmodified.
//!
//! `previrt_mb_entry` (multiboot v1: `%eax` = 0x2BADB002, `%ebx` = multiboot info) takes the
//! same path with another boot-path index, which selects the hand-over target and `%eax`.
//! `previrt_entry64` is entered in long mode (identity-mapped, IF=0, `%rdi` = boot info or 0),
//! calls the same start of day on the loader's page tables and jumps to the kernel's original
//! 64-bit entry with the original `%rdi`, `%rsi` and `%rsp`.
//!
//! The 32-bit code is position independent (it runs at physical addresses): data is addressed
//! relative to a `call`/`pop` anchor; the link provides the absolute symbols
//! `__previrt_kernel_pvh_entry`, `__previrt_kernel_mb_entry`, `__previrt_kernel_elf_entry`
//! and `__previrt_virt_delta` (virt − phys).

core::arch::global_asm!(
    r#"
    .set BOOT_PT_PAGES, 9
    .section .text.previrt_boot32, "ax", @progbits
    .code32
    /* Boot-path indices (rows of boot_targets, and previrt_boot's second argument). */
    .set BOOT_PVH, 0
    .set BOOT_MULTIBOOT, 1
    .set BOOT_ELF64, 2
    .globl previrt_mb_entry
previrt_mb_entry:
    movl %eax, %esi
    movl $BOOT_MULTIBOOT, %edi
    jmp boot32
    .globl previrt_pvh_entry
previrt_pvh_entry:
    xorl %esi, %esi
    movl $BOOT_PVH, %edi
boot32:
    cli
    cld
    /* No stack yet (PVH leaves %esp undefined) but `call` needs one to find out where we
       run: borrow the first word of hvm_start_info, then put it back. */
    movl (%ebx), %eax
    leal 4(%ebx), %esp
    call 1f
1:  popl %ebp
    movl %eax, (%ebx)
    movl %ebx, (pvh_ebx - 1b)(%ebp)
    movl %esi, (boot_eax - 1b)(%ebp)
    movl %edi, (boot_path - 1b)(%ebp)
    leal (boot_stack_top - 1b)(%ebp), %esp

    movl %cr0, %eax
    movl %eax, (saved_cr0 - 1b)(%ebp)
    movl %cr4, %eax
    movl %eax, (saved_cr4 - 1b)(%ebp)
    movl $0xc0000080, %ecx
    rdmsr
    movl %eax, (saved_efer - 1b)(%ebp)

    /* Zero the page tables. */
    leal (boot_pml4 - 1b)(%ebp), %edi
    xorl %eax, %eax
    movl $(BOOT_PT_PAGES * 1024), %ecx
    rep stosl

    /* Identity map 0..4 GiB: pml4[0] -> pdpt_lo; pdpt_lo[0..4] -> pd_lo[0..4]. */
    leal (boot_pdpt_lo - 1b)(%ebp), %eax
    orl $3, %eax
    movl %eax, (boot_pml4 - 1b)(%ebp)
    leal (boot_pd_lo - 1b)(%ebp), %eax
    orl $3, %eax
    leal (boot_pdpt_lo - 1b)(%ebp), %edi
    movl $4, %ecx
2:  movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 2b
    leal (boot_pd_lo - 1b)(%ebp), %edi
    movl $2048, %edx
    call boot_fill_pd

    /* Kernel window: virt [delta, delta + 2 GiB) -> phys [0, 2 GiB) when delta != 0.
       previrt link checks delta is 1 GiB aligned, leaves pml4[0] alone and fits one pdpt. */
    movl (virt_delta - 1b)(%ebp), %esi
    movl (virt_delta + 4 - 1b)(%ebp), %edx
    movl %esi, %eax
    orl %edx, %eax
    jz 5f
    movl %edx, %eax
    shrl $7, %eax
    andl $511, %eax
    leal (boot_pdpt_hi - 1b)(%ebp), %ebx
    orl $3, %ebx
    leal (boot_pml4 - 1b)(%ebp), %edi
    movl %ebx, (%edi, %eax, 8)
    movl %edx, %eax
    andl $0x7f, %eax
    shll $2, %eax
    shrl $30, %esi
    orl %esi, %eax
    leal (boot_pdpt_hi - 1b)(%ebp), %edi
    leal (boot_pd_hi - 1b)(%ebp), %ebx
    orl $3, %ebx
    movl %ebx, (%edi, %eax, 8)
    addl $4096, %ebx
    movl %ebx, 8(%edi, %eax, 8)
    leal (boot_pd_hi - 1b)(%ebp), %edi
    movl $1024, %edx
    call boot_fill_pd
5:
    /* Long mode: PAE, CR3, EFER.LME, our GDT, paging. */
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    leal (boot_pml4 - 1b)(%ebp), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    leal (boot_gdt - 1b)(%ebp), %eax
    movl %eax, (boot_gdtr + 2 - 1b)(%ebp)
    lgdt (boot_gdtr - 1b)(%ebp)
    /* Reload CS and the data segments from our GDT before paging: PVH promises flat
       segments but nothing about the descriptor caches (KVM refuses CR0.PG with CS.L set). */
    leal (7f - 1b)(%ebp), %eax
    pushl $0x08
    pushl %eax
    lret
7:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    leal (boot_long - 1b)(%ebp), %eax
    pushl $0x18
    pushl %eax
    lret

    .code32
/* Fill the page directories at %edi with %edx 2 MiB entries mapping physical 0 upwards. */
boot_fill_pd:
    xorl %ecx, %ecx
3:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, (%edi, %ecx, 8)
    incl %ecx
    cmpl %edx, %ecx
    jb 3b
    ret

boot_exit32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    call 6f
6:  popl %ebp
    /* The entry CR0 has paging off: restoring it leaves long mode. */
    movl (saved_cr0 - 6b)(%ebp), %eax
    movl %eax, %cr0
    movl $0xc0000080, %ecx
    rdmsr
    movl (saved_efer - 6b)(%ebp), %eax
    wrmsr
    movl (saved_cr4 - 6b)(%ebp), %eax
    movl %eax, %cr4
    movl (pvh_ebx - 6b)(%ebp), %ebx
    movl (boot_eax - 6b)(%ebp), %eax
    movl (boot_path - 6b)(%ebp), %edx
    movl (boot_targets - 6b)(%ebp, %edx, 4), %edx
    xorl %ecx, %ecx
    xorl %esi, %esi
    xorl %edi, %edi
    /* PVH and multiboot leave %esp undefined; the kernel gets the runtime's boot stack, so
       that its sites that run before it sets up a stack can still call the runtime. */
    leal (boot_stack_top - 6b)(%ebp), %esp
    xorl %ebp, %ebp
    jmp *%edx
    .code64

    .section .text.previrt_boot64, "ax", @progbits
    .code64
boot_long:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %esp, %esp
    movl pvh_ebx(%rip), %edi
    movl boot_path(%rip), %esi
    movabsq $previrt_boot, %rax
    callq *%rax
    leaq boot_exit32(%rip), %rax
    pushq $0x08
    pushq %rax
    lretq

    /* The 64-bit ELF entry: the loader's mode, page tables and GDT stay; only the stack is
       the runtime's while the start of day runs. */
    .globl previrt_entry64
previrt_entry64:
    cli
    cld
    movq %rdi, entry64_regs(%rip)
    movq %rsi, entry64_regs + 8(%rip)
    movq %rsp, entry64_regs + 16(%rip)
    leaq boot_stack_top(%rip), %rsp
    movl $BOOT_ELF64, %esi
    movabsq $previrt_boot, %rax
    callq *%rax
    movq entry64_regs(%rip), %rdi
    movq entry64_regs + 8(%rip), %rsi
    movq entry64_regs + 16(%rip), %rsp
    movabsq $__previrt_kernel_elf_entry, %rax
    jmp *%rax


    .section .data.previrt_boot, "aw", @progbits
    .balign 8
pvh_ebx:    .quad 0
boot_eax:   .long 0
boot_path:  .long 0
boot_targets:
    .long __previrt_kernel_pvh_entry, __previrt_kernel_mb_entry
entry64_regs: .quad 0, 0, 0
saved_cr0:  .quad 0
saved_cr4:  .quad 0
saved_efer: .quad 0
virt_delta: .quad __previrt_virt_delta
boot_gdt:
    .quad 0
    /* Accessed bits preset, so loading a selector never writes the GDT. */
    .quad 0x00cf9b000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf93000000ffff    /* 0x10: data */
    .quad 0x00af9b000000ffff    /* 0x18: 64-bit code */
boot_gdt_end:
    .balign 8
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long 0

    .section .bss.previrt_boot, "aw", @nobits
    /* The root at an even page (CR3 bit 12 clear): with KVM-PVM's native mode on, a root
       with bit 12 set makes the host run the boot natively, which these tables (no U bits)
       and the runtime's detection (cpuid) are not meant for (docs/pvm.md). */
    .balign 8192
boot_pml4:    .skip 4096
boot_pdpt_lo: .skip 4096
boot_pd_lo:   .skip 4 * 4096
boot_pdpt_hi: .skip 4096
boot_pd_hi:   .skip 2 * 4096
boot_stack:   .skip 32768
boot_stack_top:
    .text
"#,
    options(att_syntax, raw)
);

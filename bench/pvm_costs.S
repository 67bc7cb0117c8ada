/* What each kind of host trap costs a guest in KVM-PVM's native mode (bench/pvm_floor.sh).
   Linked with bench/pvm_guest.S in place of bench/pvm_loop.S: pvm_guest.S enters the mode
   (its page tables, GDT, 0x33 gates), prints "mode=native result=" and calls pvm_compute
   with N from the command line. This pvm_compute prints "costs n=N" (completing that line),
   then one line per event class and exits with 0 itself (never returns):

     CLASS median=M mean=A      TSC cycles for one event (N samples, each timed alone)

   Each sample is one event between `lfence; rdtsc` pairs; everything else the event needs
   (a new PTE value, the next root) is prepared outside the window. Classes:
     rdtsc    nothing (the window's own overhead)
     trap     `int $0x1a`: the host answers it as CPUID, the cheapest trap known here
     cr3      `mov %rax, %cr3` alternating between two roots that map the same
     pf       a read of an address whose 4K leaf entry is not present: the host delivers #PF
              through the IDT (a trap gate to 0x33, as the runtime's), the handler moves RIP
              past exactly that read, puts 0x33/0x2b in the frame and `iretq`s
     write    a store that replaces a present entry in a 4K leaf table the host shadows and
              last synced at the previous `invlpg` (write-protected: the host faults)
     write2   a store into the same table right after (is it still write-protected?)
     invlpg   `invlpg` of the replaced entry's address
     touch    the first read through the replaced entry (checked: it sees the new frame)
   The last four run in one loop in that order, once per sample, as the runtime does for a
   replaced entry (its copy's store, its `invlpg`, the kernel's access). */
.code64
.set MAX_N, 4096
.set SCRATCH_VA, 0x40000000        /* PDPT slot 1 of pvm_guest.S's map: nothing there */
.set PTE_LEAF, 0x67                 /* P | RW | U | A | D: as the runtime's copies, no A/D fault */
.set PTE_TABLE, 0x27                /* P | RW | U | A */
.set CLASS_SIZE, MAX_N * 4

.text
.globl pvm_compute
/* %rdi = samples per class (at most MAX_N). */
pvm_compute:
    cmp $MAX_N, %rdi
    jbe 1f
    mov $MAX_N, %edi
1:  test %rdi, %rdi
    jnz 1f
    mov $1, %edi
1:  mov %rdi, %r15                  /* N for the whole run */
    lea s_costs(%rip), %rsi
    call puts
    mov %r15, %rax
    call putdec
    mov $10, %al
    call putc
    call map_scratch
    call set_pf_gate

    /* rdtsc: the empty window. */
    xor %r14d, %r14d
1:  call t0
    call t1_class0
    inc %r14
    cmp %r15, %r14
    jb 1b
    lea s_rdtsc(%rip), %rsi
    call report0

    /* trap: int $0x1a (CPUID leaf 0 from the VMM's table). */
    xor %r14d, %r14d
1:  xor %eax, %eax
    xor %ecx, %ecx
    call t0
    int $0x1a
    call t1_class0
    inc %r14
    cmp %r15, %r14
    jb 1b
    lea s_trap(%rip), %rsi
    call report0

    /* cr3: alternate between the two roots. */
    xor %r14d, %r14d
1:  mov %r14, %rax
    and $1, %eax
    mov roots(,%rax,8), %rax
    call t0
    mov %rax, %cr3
    call t1_class0
    inc %r14
    cmp %r15, %r14
    jb 1b
    mov roots(%rip), %rax           /* end on pvm_guest.S's own root */
    mov %rax, %cr3
    lea s_cr3(%rip), %rsi
    call report0

    /* pf: a read through a not-present leaf entry, skipped by pf_handler. */
    xor %r14d, %r14d
1:  call t0
pf_at:
    mov SCRATCH_VA + 0x1000, %rax
pf_resume:
    call t1_class0
    inc %r14
    cmp %r15, %r14
    jb 1b
    lea s_pf(%rip), %rsi
    call report0

    /* write, write2, invlpg, touch: replace leaf entry 0 by the other frame each time. */
    xor %r14d, %r14d
1:  mov %r14, %rax
    and $1, %eax
    mov frame_ptes(,%rax,8), %rbx   /* new value of entry 0 */
    mov tags(,%rax,8), %rbp         /* what the new frame holds */
    mov %r14, %rcx
    and $1, %ecx
    shl $12, %ecx                   /* entry 511: not present, alternating 0 / 0x1000 */
    call t0
    mov %rbx, scratch_pt
    mov $0, %r13d
    call t1
    call t0
    mov %rcx, scratch_pt + 511 * 8
    mov $1, %r13d
    call t1
    call t0
    invlpg SCRATCH_VA
    mov $2, %r13d
    call t1
    call t0
    mov SCRATCH_VA, %rbx
    mov $3, %r13d
    call t1
    cmp %rbp, %rbx
    jne bad
    inc %r14
    cmp %r15, %r14
    jb 1b
    lea s_write(%rip), %rsi
    xor %r13d, %r13d
    call report
    lea s_write2(%rip), %rsi
    mov $1, %r13d
    call report
    lea s_invlpg(%rip), %rsi
    mov $2, %r13d
    call report
    lea s_touch(%rip), %rsi
    mov $3, %r13d
    call report
    xor %eax, %eax
    jmp exit
bad:
    mov $0x3d, %eax
    jmp exit

/* Scratch map: PDPT slot 1 -> scratch_pd -> scratch_pt; entry 0 -> frame A, entry 1 not
   present; a second root (bit 12 set) that is a copy of pvm_guest.S's root. */
map_scratch:
    mov %cr3, %rsi
    mov %rsi, roots
    lea scratch_pd(%rip), %rax
    or $PTE_TABLE, %rax
    mov %rsi, %rdi
    and $~0xfff, %rdi
    mov 0(%rdi), %rdx               /* PML4[0] -> the PDPT */
    and $~0xfff, %rdx
    mov %rax, 8(%rdx)               /* PDPT[1] */
    lea scratch_pt(%rip), %rax
    or $PTE_TABLE, %rax
    mov %rax, scratch_pd
    mov frame_ptes(%rip), %rax
    mov %rax, scratch_pt
    lea frames(%rip), %rax
    mov tags(%rip), %rdx
    mov %rdx, (%rax)
    mov tags + 8(%rip), %rdx
    mov %rdx, 4096(%rax)
    mov %rdi, %rsi
    lea root2(%rip), %rdi
    mov %rdi, roots + 8
    mov $512, %ecx
    rep movsq
    mov roots(%rip), %rax
    mov %rax, %cr3                  /* flush: PDPT[1] was empty */
    ret

/* IDT vector 14: trap gate, DPL 3, selector 0x33 (pvm_guest.S's IDT) to pf_handler. */
set_pf_gate:
    lea pf_handler(%rip), %rax
    lea idt + 14 * 16(%rip), %rdi
    mov %ax, (%rdi)
    movw $0xef00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    ret

/* Frame: error code, RIP, CS, RFLAGS, RSP, SS. Only the `pf` read may fault; it resumes
   after that read, on the ring-3 selectors native code really runs on (docs/pvm.md). */
pf_handler:
    push %r10
    lea pf_at(%rip), %r10
    cmp %r10, 16(%rsp)
    jne 1f
    lea pf_resume(%rip), %r10
    mov %r10, 16(%rsp)
    pop %r10
    add $8, %rsp
    movq $0x33, 8(%rsp)
    movq $0x2b, 32(%rsp)
    iretq
1:  mov $0x3c, %eax
    jmp exit

/* Window start: TSC in %r8. Keeps every register but %r8. */
t0:
    push %rax
    push %rdx
    lfence
    rdtsc
    lfence
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r8
    pop %rdx
    pop %rax
    ret
/* Window end: stores now - %r8 as sample %r14 of class %r13 (t1_class0: class 0).
   Keeps every register but %r8 and the flags. */
t1_class0:
    mov $0, %r13d
t1:
    push %rax
    push %rdx
    push %rdi
    lfence
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r8, %rdx
    mov %r13, %rdi
    imul $CLASS_SIZE, %rdi
    lea samples(%rip), %rax
    add %rax, %rdi
    mov %edx, (%rdi,%r14,4)
    pop %rdi
    pop %rdx
    pop %rax
    ret

/* Prints "NAME median=M mean=A" for class %r13 (report0: class 0); NAME at %rsi. */
report0:
    xor %r13d, %r13d
report:
    call puts
    mov %r13, %rdi
    imul $CLASS_SIZE, %rdi
    lea samples(%rip), %rax
    add %rax, %rdi                  /* %rdi = the class's samples */
    /* Insertion sort of N u32 (N <= MAX_N: at most ~8M moves, natively milliseconds). */
    mov $1, %ecx
1:  cmp %r15, %rcx
    jae 4f
    mov (%rdi,%rcx,4), %eax
    mov %rcx, %rdx
2:  test %rdx, %rdx
    jz 3f
    mov -4(%rdi,%rdx,4), %r9d
    cmp %eax, %r9d
    jbe 3f
    mov %r9d, (%rdi,%rdx,4)
    dec %rdx
    jmp 2b
3:  mov %eax, (%rdi,%rdx,4)
    inc %rcx
    jmp 1b
4:  xor %eax, %eax                  /* sum */
    xor %ecx, %ecx
5:  mov (%rdi,%rcx,4), %edx
    add %rdx, %rax
    inc %rcx
    cmp %r15, %rcx
    jb 5b
    xor %edx, %edx
    div %r15
    push %rax                       /* mean */
    mov %r15, %rcx
    shr $1, %rcx
    mov (%rdi,%rcx,4), %eax
    push %rax
    lea s_median(%rip), %rsi
    call puts
    pop %rax
    call putdec
    lea s_mean(%rip), %rsi
    call puts
    pop %rax
    call putdec
    mov $10, %al
    jmp putc

.data
s_costs:  .asciz "costs n="
s_rdtsc:  .asciz "rdtsc"
s_trap:   .asciz "trap"
s_cr3:    .asciz "cr3"
s_pf:     .asciz "pf"
s_write:  .asciz "write"
s_write2: .asciz "write2"
s_invlpg: .asciz "invlpg"
s_touch:  .asciz "touch"
s_median: .asciz " median="
s_mean:   .asciz " mean="
.balign 8
tags:       .quad 0x5ca1ab1e0000000a, 0x5ca1ab1e0000000b
frame_ptes: .quad frames + PTE_LEAF, frames + 4096 + PTE_LEAF
roots:      .quad 0, 0
.balign 8192
.skip 4096
root2:      .fill 4096, 1, 0        /* GPA bit 12 set: a native root */
scratch_pd: .fill 4096, 1, 0
scratch_pt: .fill 4096, 1, 0
frames:     .fill 8192, 1, 0
.bss
.balign 64
samples: .skip 4 * CLASS_SIZE
.section .note.GNU-stack, "", @progbits

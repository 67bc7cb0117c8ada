/* What each kind of host trap costs a guest in KVM-PVM's native mode (bench/pvm_floor.sh).
   Linked with bench/pvm_guest.S in place of bench/pvm_loop.S: pvm_guest.S enters the mode
   (its page tables, GDT, 0x33 gates), prints "mode=native result=" and calls pvm_compute
   with N from the command line. This pvm_compute prints "costs n=N" (completing that line),
   then one line per event class and exits with 0 itself (never returns):

     CLASS median=M mean=A      TSC cycles for one event (N samples, each timed alone)

   Each sample is one event between `lfence; rdtsc` pairs (a call of the class's event
   routine); everything else it needs (a new PTE value, the next root) is prepared outside
   the window. Classes (the table `classes`):
     rdtsc    nothing (the window's own overhead, with the call)
     trap     `int $0x1a`: the host answers it as CPUID, the cheapest trap known here
     cr3      `mov %rax, %cr3` alternating between two roots that map the same
     pf       a read of an address whose 4K leaf entry is not present: the host delivers #PF
              through the IDT (a trap gate to 0x33, as the runtime's), the handler moves RIP
              past exactly that read, puts 0x33/0x2b in the frame and `iretq`s
     write    a store that replaces a present entry in a 4K leaf table the host shadows and
              has synced since the last store (write-protected: the host faults; the
              previous sample's `touch` re-fault, walking the table, synced it)
     write2   a store into the same table right after (is it still write-protected?)
     invlpg   `invlpg` of the replaced entry's address
     touch    the first read through the replaced entry (checked: it sees the new frame)
   The last four form one group: each sample runs them in that order, as the runtime meets
   a replaced entry (its copy's store, its `invlpg`, the kernel's access). */
.code64
.set MAX_N, 4096
.set SCRATCH_VA, 0x40000000        /* PDPT slot 1 of pvm_guest.S's map: nothing there */
.set PTE_LEAF, 0x67                 /* P | RW | U | A | D: as the runtime's copies, no A/D fault */
.set PTE_TABLE, 0x27                /* P | RW | U | A */
.set CLASS_SIZE, MAX_N * 4           /* u32 samples of one class */
.set ENTRY, 32                      /* a `classes` entry: name, prep, event, last */
.set MAX_CLASSES, 8

.text
.globl pvm_compute
/* %rdi = samples per class (at most MAX_N). Registers across the driver: %r15 = N, %r14 =
   sample, %r12 = the group's first entry, %rbx = the current entry, %r8 = window start. */
pvm_compute:
    cmp $MAX_N, %rdi
    jbe 1f
    mov $MAX_N, %edi
1:  test %rdi, %rdi
    jnz 1f
    mov $1, %edi
1:  mov %rdi, %r15
    lea s_costs(%rip), %rsi
    call puts
    mov %r15, %rax
    call putdec
    mov $10, %al
    call putc
    call map_scratch
    call set_pf_gate
    lea classes(%rip), %r12
group:
    cmpq $0, (%r12)
    je 9f
    xor %r14d, %r14d
sample:
    mov %r12, %rbx
1:  call *8(%rbx)                   /* prep */
    call t0
    call *16(%rbx)                  /* the event */
    call t1
    cmpq $0, 24(%rbx)
    lea ENTRY(%rbx), %rbx
    je 1b
    inc %r14
    cmp %r15, %r14
    jb sample
2:  call report                     /* the group's classes: %r12 up to %rbx */
    add $ENTRY, %r12
    cmp %rbx, %r12
    jb 2b
    jmp group
9:  xor %eax, %eax
    jmp exit
bad:
    mov $0x3d, %eax
    jmp exit

/* Preps (outside the window) and events (inside it). Neither touches %rbx, %r8, %r12-%r15. */
nothing:
    ret
ev_trap:                            /* CPUID leaf 0 from the VMM's table; cpuid writes %rbx */
    push %rbx
    xor %eax, %eax
    xor %ecx, %ecx
    int $0x1a
    pop %rbx
    ret
prep_cr3:                           /* the root the last sample did not load */
    mov %r14, %rax
    and $1, %eax
    mov roots(,%rax,8), %rsi
    ret
ev_cr3:
    mov %rsi, %cr3
    ret
ev_pf:                              /* pf_handler resumes at pf_resume */
pf_at:
    mov SCRATCH_VA + 0x1000, %rax
pf_resume:
    ret
prep_write:                         /* entry 0 -> the other frame; %rbp = what it holds */
    mov %r14, %rax
    and $1, %eax
    mov frame_ptes(,%rax,8), %rsi
    mov tags(,%rax,8), %rbp
    ret
ev_write:
    mov %rsi, scratch_pt
    ret
prep_write2:                        /* entry 511: not present, alternating 0 / 0x1000 */
    mov %r14, %rdi
    and $1, %edi
    shl $12, %edi
    ret
ev_write2:
    mov %rdi, scratch_pt + 511 * 8
    ret
ev_invlpg:
    invlpg SCRATCH_VA
    ret
ev_touch:
    mov SCRATCH_VA, %rax
    cmp %rbp, %rax
    jne bad
    ret

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

/* Window start: TSC in %r8. Keeps every register but %r8 and the flags. */
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
/* Window end: stores now - %r8 as sample %r14 of entry %rbx's class. Keeps every register
   but %r8 and the flags. */
t1:
    push %rax
    push %rdx
    push %rdi
    lfence
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r8, %rdx
    mov %rbx, %rax
    call samples_of
    mov %edx, (%rdi,%r14,4)
    pop %rdi
    pop %rdx
    pop %rax
    ret
/* %rdi = the samples of the class whose entry is at %rax (clobbers %rax). */
samples_of:
    lea classes(%rip), %rdi
    sub %rdi, %rax
    imul $CLASS_SIZE / ENTRY, %rax
    lea samples(%rip), %rdi
    add %rax, %rdi
    ret

/* Prints "NAME median=M mean=A" for the class whose entry is at %r12. */
report:
    mov (%r12), %rsi
    call puts
    mov %r12, %rax
    call samples_of
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
/* The classes, in the order they run: name, prep, event, last of its group. */
.macro CLASS name, prep, event, last
    .quad \name, \prep, \event, \last
.endm
.balign 8
classes:
    CLASS s_rdtsc, nothing, nothing, 1
    CLASS s_trap, nothing, ev_trap, 1
    CLASS s_cr3, prep_cr3, ev_cr3, 1
    CLASS s_pf, nothing, ev_pf, 1
    CLASS s_write, prep_write, ev_write, 0
    CLASS s_write2, prep_write2, ev_write2, 0
    CLASS s_invlpg, nothing, ev_invlpg, 0
    CLASS s_touch, nothing, ev_touch, 1
classes_end:
    .quad 0
.if (classes_end - classes) / ENTRY > MAX_CLASSES
.error "more classes than MAX_CLASSES"
.endif
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
samples: .skip MAX_CLASSES * CLASS_SIZE
.section .note.GNU-stack, "", @progbits

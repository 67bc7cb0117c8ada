//! The Xen PV entry points, in assembly: the domain's entry (XEN_ELFNOTE_ENTRY), the site stub,
//! the event upcall, the exception trampolines, the failsafe callback, and the pages Xen
//! fills or shares (hypercall page, shared_info, a domU's console ring, the LAPIC model page).
//!
//! Xen enters `previrt_xen_entry` in long mode, ring 3, `%rsi` = start_info, events masked.
//! Exceptions and upcalls arrive on the current stack with `%rcx` and `%r11` pushed above a
//! hardware-style frame (`rip, cs, rflags, rsp, ss`, after the error code if any); the
//! trampolines pop them so the kernel's own IDT handlers see what hardware would push.
//! Returns to the kernel (`xen_iret`): the Rust halves set the event mask from the frame's
//! virtual IF and leave CS with RPL 3 for a plain `iretq` (guest kernel to guest kernel, both
//! ring 3), or — when that unmasks events and some are pending — with RPL 0, meaning "kernel
//! mode" to the `iret` hypercall, which unmasks atomically and delivers them at the interrupted
//! instruction, as hardware delivers an interrupt right after `sti`.

core::arch::global_asm!(
    concat!(
        r#"
    .section .text.previrt_xen, "ax", @progbits

    /* Return through the interrupt frame at (%rsp), as the Rust half chose (see above). */
    .macro xen_iret
    testb $3, 8(%rsp)
    jz 9f
    iretq
9:  pushq $0
    jmp previrt_xen_hypercall_page + 23 * 32
    .endm

    .globl previrt_xen_entry
previrt_xen_entry:
    cld
    leaq xen_boot_stack_top(%rip), %rsp
    movq %rsi, %rdi
    call previrt_xen_boot
    movq %rax, %rdi
    movabsq $__previrt_kernel_entry64, %rax
    jmp *%rax

    /* Sites call here: the shared site stub; the virtual interrupt flag
       (vcpu_info.evtchn_upcall_mask, set to 1 for the dispatch) goes into the saved RFLAGS.IF. */
    .globl previrt_xen_stub
previrt_xen_stub:
"#,
        crate::guest::site_stub!(
            r#"    movq previrt_xen_vcpu(%rip), %rax
    movb $1, %cl
    xchgb %cl, 1(%rax)
    andq $~0x200, 144(%rsp)
    testb %cl, %cl
    jnz 1f
    orq $0x200, 144(%rsp)
1:
"#,
            "previrt_xen_dispatch",
            "    xen_iret\n"
        ),
        r#"

    /* Save the caller-saved registers (and %rbx, which keeps the stack pointer) and align the
       stack for a Rust call; the registers keep their values. */
    .macro xen_save
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbx
    movq %rsp, %rbx
    andq $-16, %rsp
    cld
    .endm
    /* A Rust call that gets the address of the interrupt frame above the saves in %rdi. */
    .macro xen_call fn
    xen_save
    leaq 80(%rbx), %rdi
    call \fn
    movq %rbx, %rsp
    .endm
    .macro xen_restore
    popq %rbx
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    .endm

    /* Event upcall (events masked by Xen): the Rust half acknowledges the pending events and
       names the kernel handler to run, which then sees a hardware interrupt frame. */
    .globl previrt_xen_upcall
previrt_xen_upcall:
    popq %rcx
    popq %r11
    cmpb $0, previrt_xen_blocking(%rip)
    jne 2f
    xen_call previrt_xen_event
    movq %rax, previrt_xen_deliver(%rip)
    xen_restore
    cmpq $0, previrt_xen_deliver(%rip)
    popq %rax
    je 1f
    jmp *previrt_xen_deliver(%rip)
1:  xen_iret
    /* The upcall SCHEDOP_block let through (Xen::halt, in pv.rs): mask events again and
       return to the hypercall's return, the events still pending. */
2:  pushq %rax
    movq previrt_xen_vcpu(%rip), %rax
    movb $1, 1(%rax)
    popq %rax
    orq $3, 8(%rsp)
    orq $3, 32(%rsp)
    iretq

    /* #PF: a fault on a page the kernel maps but the shadow does not yet is fixed and
       retried; anything else goes to the kernel's handler. */
    .globl previrt_xen_page_fault_entry
previrt_xen_page_fault_entry:
    popq %rcx
    popq %r11
    xen_call previrt_xen_page_fault
    testq %rax, %rax
    xen_restore
    popq %rax
    jz 1f
    leaq 8(%rsp), %rsp
    xen_iret
1:  jmp *(previrt_xen_vectors + 14 * 8)(%rip)

    /* Exception vectors 0..31: 16 bytes each, to the kernel's IDT handler. */
    .balign 16
    .globl previrt_xen_traps
previrt_xen_traps:
    .set vec, 0
    .rept 32
    .balign 16
    popq %rcx
    popq %r11
    jmp *(previrt_xen_vectors + 8 * vec)(%rip)
    .set vec, vec + 1
    .endr

    /* Lean interrupt-flag entries (pv::lean; docs/xen-pv.md): the kernel's IF is
       vcpu_info.evtchn_upcall_mask (at 1(vcpu), evtchn_upcall_pending at 0(vcpu)), so cli, sti,
       pushf and popf need no register file, record lookup or hypercall. Every register and the
       arithmetic flags are kept (pushfq/popfq: ring 3 cannot change the hardware IF); nothing
       is written below %rsp (Xen may deliver an upcall on this stack at any instruction); the
       counts use lea, which leaves the flags alone. One that unmasks with events pending takes
       the stub with everything as at the call (counted there, not here): its dispatch returns
       through the iret hypercall, which delivers them at the instruction after the site. */
    .macro xen_lean_count k
    movq previrt_xen_lean_counts + 8 * \k(%rip), %rax
    leaq 1(%rax), %rax
    movq %rax, previrt_xen_lean_counts + 8 * \k(%rip)
    .endm

    .globl previrt_xen_cli
previrt_xen_cli:
    pushq %rax
    xen_lean_count 0
    movq previrt_xen_vcpu(%rip), %rax
    movb $1, 1(%rax)
    popq %rax
    ret

    /* Stack: 0 rdx, 8 rax, 16 flags, 24 return address. */
    .globl previrt_xen_sti
previrt_xen_sti:
    pushfq
    pushq %rax
    pushq %rdx
    movq previrt_xen_vcpu(%rip), %rax
    movb $0, 1(%rax)
    cmpb $0, (%rax)
    jne xen_lean_stub
    xen_lean_count 1
    popq %rdx
    popq %rax
    popfq
    ret
xen_lean_stub:
    popq %rdx
    popq %rax
    popfq
    jmp previrt_xen_stub

    /* pushf: the hardware flags with IF = !mask where the return address was; the return
       address moves into the saved flags' slot, the flags one below. */
    .globl previrt_xen_pushf
previrt_xen_pushf:
    pushfq
    pushq %rax
    pushq %rdx
    xen_lean_count 2
    movq previrt_xen_vcpu(%rip), %rax
    movzbl 1(%rax), %eax
    xorl $1, %eax
    shll $9, %eax
"#,
        crate::guest::lean_pushf_exit!(),
        r#"
    /* popf: mask = !(the popped image's IF), the rest into the hardware flags; the return
       address moves onto the popped slot. Stack: 0 rdx, 8 rax, 16 flags, 24 return address,
       32 the image. */
    .globl previrt_xen_popf
previrt_xen_popf:
    pushfq
    pushq %rax
    pushq %rdx
    movq 32(%rsp), %rdx
    shrq $9, %rdx
    andl $1, %edx
    xorl $1, %edx
    movq previrt_xen_vcpu(%rip), %rax
    movb %dl, 1(%rax)
    testl %edx, %edx
    jnz 1f
    cmpb $0, (%rax)
    jne xen_lean_stub
1:  xen_lean_count 3
"#,
        crate::guest::lean_popf_exit!(),
        r#"
    /* Lean byte port I/O through %dx (inb %dx, %al / outb %al, %dx: the kernel's UART and
       PIC accesses), pv::previrt_xen_port_lean does the access on the device models with
       events masked and unmasks them again as they were (delivering what is pending). The
       caller-saved registers and the flags are kept around the Rust call (%rbx realigns the
       stack); `in` replaces %al in the saved %rax. Stack after the saves: 0 rbx, 8 r11, ...,
       72 rax, 80 flags, 88 return address. */
    .macro xen_lean_port dir
    pushfq
    xen_save
    movzwl %dx, %edi
    movzbl %al, %esi
    movl $\dir, %edx
    call previrt_xen_port_lean
    movq %rbx, %rsp
    movb %al, 72(%rsp)
    xen_restore
    popq %rax
    popfq
    ret
    .endm

    .globl previrt_xen_inb_dx, previrt_xen_outb_dx
previrt_xen_inb_dx:
    xen_lean_port 0
previrt_xen_outb_dx:
    xen_lean_port 1

    .globl previrt_xen_failsafe
previrt_xen_failsafe:
    andq $-16, %rsp
    call previrt_xen_failsafe_report
    ud2

    .section .bss.previrt_xen, "aw", @nobits
    .balign 4096
    .globl previrt_xen_hypercall_page, previrt_xen_shared_info, previrt_xen_lapic, previrt_xen_console
previrt_xen_hypercall_page: .skip 4096
previrt_xen_shared_info: .skip 4096
previrt_xen_lapic: .skip 4096
previrt_xen_console: .skip 4096
xen_boot_stack: .skip 16384
xen_boot_stack_top:
    .text
"#
    ),
    options(att_syntax, raw)
);

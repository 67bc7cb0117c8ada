//! The previrt paravirtual ABI end to end: a guest of our own (assembled here from the
//! constants of `previrt-hv-abi`) detects the hypervisor, installs the hypercall page and its
//! vCPU page, and uses every service; hostile guests get error codes or a clear stop.

mod vmm_support;
use previrt_hv_abi::{self as abi, hc, offsets};
use vmm_support::*;

/// `.equ` lines for the ABI constants, so the guest is written against the crate.
fn abi_equs() -> String {
    let (b, c, d) = abi::signature_regs();
    let pairs: &[(&str, u64)] = &[
        ("SIG_EBX", b as u64),
        ("SIG_ECX", c as u64),
        ("SIG_EDX", d as u64),
        ("CPUID_BASE", abi::CPUID_BASE as u64),
        ("CPUID_VERSION", abi::CPUID_VERSION as u64),
        ("ABI_VERSION", abi::ABI_VERSION as u64),
        ("MSR_HC", abi::MSR_HYPERCALL_PAGE as u64),
        ("MSR_VCPU", abi::MSR_VCPU_PAGE as u64),
        ("STUB", abi::HYPERCALL_STUB_SIZE as u64),
        ("HC_VERSION", hc::VERSION),
        ("HC_CONSOLE_WRITE", hc::CONSOLE_WRITE),
        ("HC_CONSOLE_FLUSH", hc::CONSOLE_FLUSH),
        ("HC_SET_EVENT_VECTOR", hc::SET_EVENT_VECTOR),
        ("HC_TIMER_SET", hc::TIMER_SET),
        ("HC_HALT", hc::HALT),
        ("HC_SHUTDOWN", hc::SHUTDOWN),
        ("HC_BLOCK_INFO", hc::BLOCK_INFO),
        ("HC_BLOCK_KICK", hc::BLOCK_KICK),
        ("TIMER_PERIODIC", abi::timer::PERIODIC),
        ("TIMER_STOP", abi::timer::STOP),
        ("OFF_VIF", offsets::VIF as u64),
        ("OFF_PENDING", offsets::PENDING as u64),
        ("OFF_CHEAD", offsets::CONSOLE_HEAD as u64),
        ("OFF_CTAIL", offsets::CONSOLE_TAIL as u64),
        ("OFF_CDATA", offsets::CONSOLE_DATA as u64),
        ("OFF_BPROD", offsets::BLOCK_PROD as u64),
        ("OFF_BCONS", offsets::BLOCK_CONS as u64),
        ("OFF_BREQS", offsets::BLOCK_REQS as u64),
        ("CONSOLE_DOORBELL", abi::CONSOLE_DOORBELL_PORT as u64),
        ("ENOSYS", abi::err::NOSYS as u64),
        ("EINVAL", abi::err::INVAL as u64),
        ("EFAULT", abi::err::FAULT as u64),
    ];
    pairs.iter().map(|(n, v)| format!(".equ {n}, {v:#x}\n")).collect()
}

/// Common guest prologue: detect, install the pages, IDT gate 0x40 → `upcall`, which counts
/// ticks in `ticks`, clears pending, and re-enables the virtual IF. Failures exit with the
/// step number (status (n << 1) | 1).
const PROLOGUE: &str = r#"
.code64
.globl _start
_start:
    mov $1, %r15                 /* step 1: CPUID signature */
    mov $CPUID_BASE, %eax
    cpuid
    cmp $SIG_EBX, %ebx
    jne fail
    cmp $SIG_ECX, %ecx
    jne fail
    cmp $SIG_EDX, %edx
    jne fail
    mov $2, %r15                 /* step 2: version leaf */
    mov $CPUID_VERSION, %eax
    cpuid
    cmp $ABI_VERSION, %eax
    jne fail
    mov $3, %r15                 /* step 3: install pages */
    mov $MSR_HC, %ecx
    lea hcpage(%rip), %rax
    or $1, %rax
    xor %edx, %edx
    wrmsr
    mov $MSR_VCPU, %ecx
    lea vpage(%rip), %rax
    or $1, %rax
    xor %edx, %edx
    wrmsr
    mov $4, %r15                 /* step 4: VERSION hypercall */
    call hcpage + STUB * HC_VERSION
    cmp $ABI_VERSION, %rax
    jne fail
    lea upcall(%rip), %rax       /* IDT gate 0x40 */
    lea idt + 0x40 * 16(%rip), %rcx
    mov %ax, (%rcx)
    movw $0x10, 2(%rcx)
    movw $0x8e00, 4(%rcx)
    shr $16, %rax
    mov %ax, 6(%rcx)
    shr $16, %rax
    mov %eax, 8(%rcx)
    lidt idtr(%rip)
    jmp main

upcall:
    incq ticks(%rip)
    push %rax
    xor %eax, %eax
    xchg %rax, vpage + OFF_PENDING(%rip)
    or %rax, seen(%rip)
    movl $1, vpage + OFF_VIF(%rip)
    pop %rax
    iretq

fail:
    mov %r15, %rdi
    or $0x80, %rdi
    call hcpage + STUB * HC_SHUTDOWN
    hlt

/* ring_puts: copy NUL-terminated %rsi into the console ring (no flush). */
ring_puts:
    mov vpage + OFF_CHEAD(%rip), %ecx
1:  lodsb
    test %al, %al
    jz 2f
    mov %ecx, %edx
    and $2047, %edx
    lea vpage + OFF_CDATA(%rip), %rdi
    mov %al, (%rdi, %rdx)
    inc %ecx
    jmp 1b
2:  mov %ecx, vpage + OFF_CHEAD(%rip)
    ret
"#;

const EPILOGUE: &str = r#"
.data
ticks: .quad 0
seen: .quad 0
.balign 16
idtr: .word 256*16-1
      .quad idt
.bss
.balign 4096
hcpage: .skip 4096
vpage: .skip 4096
idt: .skip 4096
buf: .skip 4096
"#;

fn pv_guest(name: &str, main: &str) -> std::path::PathBuf {
    let d = scratch(name);
    let src = format!("{}{PROLOGUE}{main}{EPILOGUE}", abi_equs());
    guest(&d, "g", &src, "_start")
}

#[test]
fn pv_console_timer_events_halt_and_shutdown() {
    let k = pv_guest(
        "pv_services",
        r#"
main:
    mov $5, %r15                 /* step 5: console ring + flush */
    lea msg1(%rip), %rsi
    call ring_puts
    call hcpage + STUB * HC_CONSOLE_FLUSH
    cmp $msg1_len, %rax
    jne fail
    mov $6, %r15                 /* step 6: direct console write */
    lea msg2(%rip), %rdi
    mov $msg2_len, %rsi
    call hcpage + STUB * HC_CONSOLE_WRITE
    cmp $msg2_len, %rax
    jne fail
    mov $7, %r15                 /* step 7: unknown hypercall and bad timer are refused */
    call hcpage + STUB * 100
    cmp $ENOSYS, %rax
    jne fail
    mov $TIMER_PERIODIC, %rdi
    mov $1, %rsi
    call hcpage + STUB * HC_TIMER_SET
    cmp $EINVAL, %rax
    jne fail
    lea msg1(%rip), %rdi
    mov $100000, %rsi
    call hcpage + STUB * HC_CONSOLE_WRITE
    cmp $EINVAL, %rax
    jne fail
    mov $0x7fff0000, %rdi
    mov $16, %rsi
    call hcpage + STUB * HC_CONSOLE_WRITE
    cmp $EFAULT, %rax
    jne fail
    mov $8, %r15                 /* step 8: periodic 1 ms timer, upcalls while halted */
    mov $0x40, %rdi
    call hcpage + STUB * HC_SET_EVENT_VECTOR
    mov $TIMER_PERIODIC, %rdi
    mov $1000000, %rsi
    call hcpage + STUB * HC_TIMER_SET
    test %rax, %rax
    jnz fail
    movl $1, vpage + OFF_VIF(%rip)
    sti
1:  call hcpage + STUB * HC_HALT
    cmpq $5, ticks(%rip)
    jb 1b
    mov $TIMER_STOP, %rdi
    call hcpage + STUB * HC_TIMER_SET
    mov $9, %r15                 /* step 9: with the virtual IF clear, events stay pending */
    movl $0, vpage + OFF_VIF(%rip)
    mov ticks(%rip), %rbx
    mov $1, %rdi                 /* one-shot */
    mov $200000, %rsi
    call hcpage + STUB * HC_TIMER_SET
    call hcpage + STUB * HC_HALT
    test $1, %al
    jz fail
    cmp ticks(%rip), %rbx
    jne fail
    lea msg3(%rip), %rsi
    call ring_puts
    mov $CONSOLE_DOORBELL, %dx   /* the doorbell drains the ring too */
    out %al, %dx
    movq $0, vpage + OFF_PENDING(%rip)
    mov $10, %r15
    mov $0x2a, %rdi
    call hcpage + STUB * HC_SHUTDOWN
    jmp fail
msg1: .asciz "pv: ring ok\n"
.equ msg1_len, 12
msg2: .ascii "pv: direct ok\n"
.equ msg2_len, 14
msg3: .asciz "pv: doorbell ok\n"
"#,
    );
    let json = k.with_file_name("stats.json");
    let o = run(&k, &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0x2a), "stdout: {} stderr: {}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o), "pv: ring ok\npv: direct ok\npv: doorbell ok\n");
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(st["hypercalls"]["previrt:halt"]["count"].as_u64().unwrap() >= 1);
    assert!(st["reasons"]["upcall_injected"]["count"].as_u64().unwrap() >= 5);
    assert_eq!(st["hypercalls"]["previrt:invalid"]["count"], 1);
}

#[test]
fn pv_block_ring_reads_and_writes_the_disk_file() {
    let k = pv_guest(
        "pv_block",
        r#"
main:
    mov $5, %r15                 /* disk of 8 sectors */
    call hcpage + STUB * HC_BLOCK_INFO
    cmp $8, %rax
    jne fail
    mov $6, %r15                 /* read sector 2 into buf, then write it to sector 5 */
    lea vpage + OFF_BREQS(%rip), %rbx
    movl $0, 0(%rbx)             /* op = read */
    movl $1, 4(%rbx)             /* status, overwritten */
    movq $2, 8(%rbx)             /* sector */
    movl $1, 16(%rbx)            /* count */
    lea buf(%rip), %rax
    mov %rax, 24(%rbx)
    movl $0, 32+0(%rbx)          /* op = write */
    movq $5, 32+8(%rbx)
    movl $1, 32+16(%rbx)
    mov %rax, 32+24(%rbx)
    movl $1, 64+0(%rbx)          /* write past the end: refused */
    movq $8, 64+8(%rbx)
    movl $1, 64+16(%rbx)
    mov %rax, 64+24(%rbx)
    movl $1, 32+0(%rbx)
    movl $3, vpage + OFF_BPROD(%rip)
    call hcpage + STUB * HC_BLOCK_KICK
    cmp $3, %rax
    jne fail
    cmpl $3, vpage + OFF_BCONS(%rip)
    jne fail
    cmpl $0, 4(%rbx)
    jne fail
    cmpl $0, 32+4(%rbx)
    jne fail
    cmpl $EINVAL, 64+4(%rbx)
    jne fail
    mov $7, %r15
    cmpb $0xa5, buf+17(%rip)
    jne fail
    mov $0x2a, %rdi
    call hcpage + STUB * HC_SHUTDOWN
    jmp fail
"#,
    );
    let disk = k.with_file_name("disk.img");
    let mut img = vec![0u8; 8 * 512];
    img[2 * 512..3 * 512].fill(0xa5);
    std::fs::write(&disk, &img).unwrap();
    let o = run(&k, &["--disk", disk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0x2a), "stderr: {}", stderr(&o));
    let after = std::fs::read(&disk).unwrap();
    assert!(after[5 * 512..6 * 512].iter().all(|&b| b == 0xa5), "sector 5 was written from sector 2");
    assert!(after[..2 * 512].iter().all(|&b| b == 0));
}

#[test]
fn pv_hostile_ring_index_stops_the_guest_with_a_message() {
    let k = pv_guest(
        "pv_hostile",
        r#"
main:
    movl $100000, vpage + OFF_CHEAD(%rip)
    call hcpage + STUB * HC_CONSOLE_FLUSH
    mov $0x2a, %rdi
    call hcpage + STUB * HC_SHUTDOWN
"#,
    );
    let o = run(&k, &[]);
    assert_eq!(o.status.code(), Some(4), "stderr: {}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("console ring corrupt") && e.contains("console_flush"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn pv_halt_without_any_event_source_is_an_error_not_a_hang() {
    let k = pv_guest("pv_halt", "main:\n    call hcpage + STUB * HC_HALT\n    jmp fail\n");
    let o = run(&k, &[]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("sleep forever"), "{}", stderr(&o));
}

#[test]
fn abi_none_offers_no_hypervisor_leaves() {
    let d = scratch("pv_none");
    let src = format!(
        r#"{}
.code64
.globl _start
_start:
    mov $CPUID_BASE, %eax
    cpuid
    mov $1, %eax
    cmp $SIG_EBX, %ebx
    jne exit
    mov $2, %eax
    jmp exit
{EXIT64}"#,
        abi_equs()
    );
    let k = guest(&d, "g", &src, "_start");
    assert_eq!(run(&k, &["--abi", "none"]).status.code(), Some(3), "no signature with --abi none");
    assert_eq!(run(&k, &[]).status.code(), Some(5), "signature by default");
}

#[test]
fn hypercalls_from_user_mode_are_refused() {
    // The kernel installs the pages, then drops to ring 3 with IOPL 3 (so `out` works there)
    // and calls VERSION: the VMM must answer -EPERM (-1). Exit 1 if refused, 2 if answered.
    let k = pv_guest(
        "pv_user",
        r#"
main:
    lgdt gdtr(%rip)
    lea tss(%rip), %rax
    lea gdt+0x28(%rip), %rdi
    movw $0x67, (%rdi)
    mov %ax, 2(%rdi)
    shr $16, %rax
    mov %al, 4(%rdi)
    movb $0x89, 5(%rdi)
    mov %ah, 7(%rdi)
    mov $0x28, %ax
    ltr %ax
    pushq $0x23
    lea ustack_top(%rip), %rax
    push %rax
    pushq $0x3002                /* IOPL 3 */
    pushq $0x1b
    lea user(%rip), %rax
    push %rax
    iretq
user:
    call hcpage + STUB * HC_VERSION
    mov $1, %edi
    cmp $-1, %rax
    je 1f
    mov $2, %edi
1:  mov %edi, %eax
    mov $0xf4, %dx
    out %eax, %dx
    hlt
.data
.balign 16
gdt: .quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00affb000000ffff, 0x00cff3000000ffff, 0, 0
gdtr: .word 7*8-1
      .quad gdt
tss: .fill 104, 1, 0
.bss
.balign 4096
.skip 4096
ustack_top:
"#,
    );
    let o = run(&k, &["--stats"]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("refused:user-mode"), "{}", stderr(&o));
}

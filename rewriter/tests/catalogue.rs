//! Every catalogue entry from real encodings: a `.s` with every form (operand sizes, prefixes,
//! rep, imm8/dx ports, 16/32-bit code), assembled by the system `as`, scanned, and compared
//! instruction by instruction; and ordinary instructions that must never be flagged.

mod support;

use previrt_rewriter::catalogue::{classify, ENTRIES};
use previrt_rewriter::elf::Elf;
use previrt_rewriter::record;
use previrt_rewriter::scan::scan_elf;
use previrt_site_abi::{flags, Kind};
use std::collections::BTreeMap;

/// (AT&T source line, expected kind). Every line is one instruction.
const TEXT64: &[(&str, &str)] = &[
    ("cli", "cli"),
    ("sti", "sti"),
    ("pushf", "pushf"),
    ("pushfw", "pushf"),
    ("pushfq", "pushf"),
    ("popf", "popf"),
    ("popfw", "popf"),
    ("popfq", "popf"),
    ("iret", "iret"),
    ("iretw", "iret"),
    ("iretl", "iret"),
    ("iretq", "iret"),
    ("mov %cr0,%rax", "mov_cr"),
    ("mov %cr2,%rbx", "mov_cr"),
    ("mov %cr3,%r15", "mov_cr"),
    ("mov %cr4,%rcx", "mov_cr"),
    ("mov %cr8,%rax", "mov_cr"),
    ("mov %rax,%cr0", "mov_cr"),
    ("mov %rdi,%cr3", "mov_cr"),
    ("mov %r9,%cr4", "mov_cr"),
    ("mov %rax,%cr8", "mov_cr"),
    ("mov %db0,%rax", "mov_dr"),
    ("mov %db6,%rsi", "mov_dr"),
    ("mov %db7,%r10", "mov_dr"),
    ("mov %rax,%db7", "mov_dr"),
    ("mov %rbx,%db0", "mov_dr"),
    ("clts", "clts"),
    ("lmsw %ax", "lmsw"),
    ("lmsw (%rdi)", "lmsw"),
    ("smsw %eax", "smsw"),
    ("smsw %rax", "smsw"),
    ("smsw %ax", "smsw"),
    ("smsw (%rsi)", "smsw"),
    ("mov %ds,%eax", "mov_seg"),
    ("mov %es,%ax", "mov_seg"),
    ("mov %fs,%rax", "mov_seg"),
    ("mov %gs,(%rdi)", "mov_seg"),
    ("mov %cs,%ecx", "mov_seg"),
    ("mov %ss,%edx", "mov_seg"),
    ("mov %eax,%ds", "mov_seg"),
    ("mov %ax,%es", "mov_seg"),
    ("mov (%rax),%fs", "mov_seg"),
    ("mov %rcx,%gs", "mov_seg"),
    ("mov %edx,%ss", "mov_seg"),
    ("push %fs", "push_seg"),
    ("push %gs", "push_seg"),
    ("pushw %fs", "push_seg"),
    ("pushw %gs", "push_seg"),
    ("pop %fs", "pop_seg"),
    ("pop %gs", "pop_seg"),
    ("popw %fs", "pop_seg"),
    ("popw %gs", "pop_seg"),
    ("lgdt (%rax)", "lgdt"),
    ("lgdt gdt_desc(%rip)", "lgdt"),
    ("lidt 8(%rsp)", "lidt"),
    ("lldt %ax", "lldt"),
    ("lldt (%rdi)", "lldt"),
    ("ltr %cx", "ltr"),
    ("ltr 2(%rax)", "ltr"),
    ("sgdt (%rdi)", "sgdt"),
    ("sidt 0x10(%rbx,%rcx,8)", "sidt"),
    ("sldt %eax", "sldt"),
    ("sldt %rax", "sldt"),
    ("sldt (%rax)", "sldt"),
    ("str %eax", "str"),
    ("str %rax", "str"),
    ("str (%rdi)", "str"),
    ("lar %ecx,%eax", "lar"),
    ("lar %cx,%ax", "lar"),
    ("lar (%rdi),%eax", "lar"),
    ("lsl %ecx,%eax", "lsl"),
    ("lsl (%rdi),%rax", "lsl"),
    ("verr %ax", "verr"),
    ("verr (%rdi)", "verr"),
    ("verw %cx", "verw"),
    ("verw 2(%rsp)", "verw"),
    ("lcall *(%rax)", "far_call"),
    (".byte 0x48,0xff,0x1b # lcallq *(%rbx), m16:64", "far_call"),
    ("lcallw *(%rcx)", "far_call"),
    ("ljmp *(%rax)", "far_jmp"),
    (".byte 0x48,0xff,0x2b # ljmpq *(%rbx), m16:64", "far_jmp"),
    ("ljmpw *8(%rsp)", "far_jmp"),
    ("lret", "far_ret"),
    ("lretq", "far_ret"),
    ("lretw", "far_ret"),
    ("lret $8", "far_ret"),
    ("lretq $16", "far_ret"),
    ("invlpg (%rax)", "invlpg"),
    ("invlpg gdt_desc(%rip)", "invlpg"),
    ("invpcid (%rdi),%rax", "invpcid"),
    ("invd", "invd"),
    ("wbinvd", "wbinvd"),
    ("wbnoinvd", "wbinvd"),
    ("in $0x60,%al", "in"),
    ("in $0x60,%ax", "in"),
    ("in $0x60,%eax", "in"),
    ("in (%dx),%al", "in"),
    ("inw (%dx),%ax", "in"),
    ("in %dx,%eax", "in"),
    ("out %al,$0x80", "out"),
    ("out %ax,$0x80", "out"),
    ("out %eax,$0x80", "out"),
    ("out %al,(%dx)", "out"),
    ("out %ax,%dx", "out"),
    ("outl %eax,(%dx)", "out"),
    ("insb", "ins"),
    ("insw", "ins"),
    ("insl", "ins"),
    ("rep insb", "ins"),
    ("rep insw", "ins"),
    ("rep insl", "ins"),
    ("addr32 rep insb", "ins"),
    ("outsb", "outs"),
    ("outsw", "outs"),
    ("outsl", "outs"),
    ("rep outsb", "outs"),
    ("rep outsw", "outs"),
    ("rep outsl", "outs"),
    ("rep outsb %fs:(%rsi),(%dx)", "outs"),
    ("rdmsr", "rdmsr"),
    ("wrmsr", "wrmsr"),
    (".byte 0x0f,0x01,0xc6 # wrmsrns", "wrmsr"),
    ("cpuid", "cpuid"),
    ("rdpmc", "rdpmc"),
    ("xsetbv", "xsetbv"),
    ("rdfsbase %rax", "rdfsbase"),
    ("rdfsbase %eax", "rdfsbase"),
    ("rdgsbase %r12", "rdgsbase"),
    ("wrfsbase %rdi", "wrfsbase"),
    ("wrgsbase %rax", "wrgsbase"),
    ("wrgsbase %ecx", "wrgsbase"),
    ("swapgs", "swapgs"),
    ("hlt", "hlt"),
    ("sysret", "sysret"),
    ("sysretq", "sysret"),
    ("sysexit", "sysexit"),
    ("sysexitq", "sysexit"),
    ("int $0x80", "int"),
    ("int $0x1a", "int"),
    ("monitor", "monitor"),
    ("monitor %rax,%ecx,%edx", "monitor"),
    ("mwait", "mwait"),
    ("vmcall", "vmcall"),
    ("vmmcall", "vmmcall"),
    ("rdtsc", "rdtsc"),
    ("rdtscp", "rdtscp"),
];

/// 32-bit code in a `.text32` section.
const TEXT32: &[(&str, &str)] = &[
    ("pushfl", "pushf"),
    ("popfl", "popf"),
    ("iret", "iret"),
    ("mov %cr0,%eax", "mov_cr"),
    ("mov %eax,%cr3", "mov_cr"),
    ("mov %db7,%eax", "mov_dr"),
    ("push %fs", "push_seg"),
    ("pop %gs", "pop_seg"),
    ("lgdt (%eax)", "lgdt"),
    ("lcall $0x10,$0x1000", "far_call"),
    ("ljmp $0x10,$0x1000", "far_jmp"),
    ("lcall *(%eax)", "far_call"),
    ("sysexit", "sysexit"),
    ("sysret", "sysret"),
    ("in $0x71,%al", "in"),
    ("int $0x10", "int"),
    ("lret", "far_ret"),
];

/// 16-bit code in a `.text16` section.
const TEXT16: &[(&str, &str)] = &[
    ("pushf", "pushf"),
    ("cli", "cli"),
    ("lmsw %ax", "lmsw"),
    ("mov %eax,%cr0", "mov_cr"),
    ("ljmp $0x8,$0x100", "far_jmp"),
    ("out %al,$0x70", "out"),
    ("lidtw (%bx)", "lidt"),
];

fn source() -> String {
    let mut s = String::from(".text\n.globl everything\neverything:\n");
    for (line, _) in TEXT64 {
        s += &format!("\t{line}\n");
    }
    s += "\n.section .text32,\"ax\",@progbits\n.code32\n";
    for (line, _) in TEXT32 {
        s += &format!("\t{line}\n");
    }
    s += "\n.section .text16,\"ax\",@progbits\n.code16\n";
    for (line, _) in TEXT16 {
        s += &format!("\t{line}\n");
    }
    s += ".code64\n.data\ngdt_desc: .quad 0, 0\n";
    s
}

#[test]
fn every_form_is_classified_exactly() {
    let dir = support::scratch("catalogue");
    let obj = support::assemble(&dir, "everything", &source(), &["--64"]);
    let data = std::fs::read(&obj).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let hits = scan_elf(&elf);

    for (name, forms, bits) in [(".text", TEXT64, 64), (".text32", TEXT32, 32), (".text16", TEXT16, 16)] {
        let sec = elf.section_by_name(name).unwrap().index;
        let got: Vec<(&str, String, u32)> =
            hits.iter().filter(|h| h.section == sec).map(|h| (h.entry.name(), h.att(), h.bitness)).collect();
        let want: Vec<&str> = forms.iter().map(|(_, k)| *k).collect();
        let got_kinds: Vec<&str> = got.iter().map(|g| g.0).collect();
        if got_kinds != want {
            let mut msg = format!("{name}: kinds differ\n");
            for i in 0..want.len().max(got.len()) {
                msg += &format!(
                    "  {:<32} want {:<10} got {:?}\n",
                    forms.get(i).map(|f| f.0).unwrap_or("-"),
                    want.get(i).unwrap_or(&"-"),
                    got.get(i)
                );
            }
            panic!("{msg}");
        }
        assert!(got.iter().all(|g| g.2 == bits), "{name} decoded at the wrong bitness: {got:?}");
    }

    // Exact counts per kind.
    let mut want: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, k) in TEXT64.iter().chain(TEXT32).chain(TEXT16) {
        *want.entry(k).or_default() += 1;
    }
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &hits {
        *got.entry(h.entry.name()).or_default() += 1;
    }
    assert_eq!(got, want);

    // Every catalogue row is exercised by a real encoding, and every catalogue kind appears.
    for (i, e) in ENTRIES.iter().enumerate() {
        assert!(
            hits.iter().any(|h| std::ptr::eq(h.entry, e)),
            "catalogue row {i} ({}, {}) has no test encoding",
            e.name(),
            e.forms
        );
    }
    // 16/32-bit sections are reported as regions.
    let bits: Vec<u32> = elf.regions.iter().map(|r| r.bits).collect();
    assert_eq!(bits, vec![32, 16]);
}

#[test]
fn records_from_real_encodings() {
    let dir = support::scratch("records");
    let obj = support::assemble(&dir, "everything", &source(), &["--64"]);
    let data = std::fs::read(&obj).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let hits = scan_elf(&elf);
    for h in &hits {
        let r = record::operands(&h.instr, h.entry, h.bitness);
        assert_eq!(r.kind, h.entry.kind as u16);
        assert_eq!(r.insn_len as usize, h.len());
        assert_eq!(r.site_len as usize, h.len().max(5), "{}", h.att());
        assert_eq!(r.site_rel | r.save_rel | r.resume_rel | r.origin_rel, 0);
        match h.bitness {
            32 => assert!(r.has(flags::CODE32)),
            16 => assert!(r.has(flags::CODE16)),
            _ => assert!(!r.has(flags::CODE32) && !r.has(flags::CODE16)),
        }
        let att = h.att();
        // Spot checks across the table, by disassembly.
        if h.entry.kind == Kind::Out {
            assert!(r.has(flags::WRITE));
            assert_eq!(r.has(flags::IMM_PORT), att.contains('$'), "{att}");
            if r.has(flags::IMM_PORT) {
                assert_eq!(r.imm, if h.bitness == 16 { 0x70 } else { 0x80 });
            }
        }
        if h.entry.kind == Kind::Ins || h.entry.kind == Kind::Outs {
            assert_eq!(r.has(flags::REP), att.starts_with("rep"), "{att}");
        }
        if att.contains("(%rip)") || att.contains("gdt_desc") {
            assert!(r.has(flags::RIP_RELATIVE) && r.has(flags::MEM), "{att}");
        }
        if matches!(att.as_str(), "pushfw" | "popfw" | "iretq" | "sysretq" | "lretq" | "iretw") {
            assert!(r.has(flags::WIDE), "{att} should be WIDE");
        }
        if matches!(att.as_str(), "pushfq" | "popfq" | "iretl" | "sysretl" | "cli") {
            assert!(!r.has(flags::WIDE), "{att} should not be WIDE");
        }
    }
}

#[test]
fn ordinary_instructions_are_never_flagged() {
    let ordinary = [
        "mov %rax,%rbx",
        "mov (%rdi),%eax",
        "mov %eax,8(%rsp)",
        "movabs $0x1234567890,%rax",
        "push %rax",
        "push %r15",
        "pushq $1",
        "pop %rbx",
        "call 1f",
        "1: lea 8(%rax,%rbx,4),%rcx",
        "lea 1b(%rip),%rdx",
        "add %rax,%rbx",
        "sub $1,%ecx",
        "xor %eax,%eax",
        "and %rdx,%rcx",
        "or $0x20,%eax",
        "shl $3,%rax",
        "imul %rbx,%rax",
        "test %eax,%eax",
        "cmp $5,%rdi",
        "bts $8,%eax",
        "xchg %rax,(%rdi)",
        "lock cmpxchg %rcx,(%rdx)",
        "int3",
        ".byte 0xf1 # int1",
        "nop",
        "nopw %cs:0(%rax,%rax,1)",
        "pause",
        "lfence",
        "syscall",
        "sysenter",
        "jmp 2f",
        "2: jne 2b",
        "call *%rax",
        "jmp *(%rax)",
        "ret",
        "ret $8",
        "rep movsb",
        "rep stosq",
        "ud2",
        "endbr64",
        "xgetbv",
        "rdrand %rax",
        "mov %fs:0x28,%rax",
        "mov %gs:(%rdi),%rcx",
        "movq %xmm0,%rax",
        "leave",
        "cltq",
        "cqto",
    ];
    let mut src = String::from(".text\n");
    for l in ordinary {
        src += &format!("\t{l}\n");
    }
    // A long run of int3 padding, as between Linux functions.
    src += "\t.fill 4096,1,0xcc\n";
    let dir = support::scratch("ordinary");
    let obj = support::assemble(&dir, "ordinary", &src, &["--64"]);
    let data = std::fs::read(&obj).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let hits = scan_elf(&elf);
    let flagged: Vec<String> = hits.iter().map(|h| format!("{} ({})", h.att(), h.entry.name())).collect();
    assert!(flagged.is_empty(), "ordinary instructions flagged: {flagged:?}");

    // And the decoder agrees on the instruction count (no resync surprises).
    let text = elf.section_by_name(".text").unwrap();
    let mut d = iced_x86::Decoder::new(64, text.data, iced_x86::DecoderOptions::NONE);
    let mut n = 0;
    for i in &mut d {
        assert!(classify(&i).is_none());
        n += 1;
    }
    assert_eq!(n, ordinary.len() + 4096);
}

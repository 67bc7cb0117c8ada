//! Cross-check of the assembler wrapper's text table (`previrt_toolchain::mnemonics`) against
//! the rewriter's catalogue: every mnemonic form is assembled by the system `as`, decoded with
//! iced-x86 and classified; the kind must be the one the text side announces. Ordinary
//! instructions that share a mnemonic (`mov`, `push`, `jmp`) must not be flagged by either.

use previrt_rewriter::catalogue;
use previrt_rewriter::iced_x86::{Decoder, DecoderOptions};
use previrt_site_abi::Kind;
use previrt_toolchain::mnemonics::{self, Rule};
use std::collections::BTreeSet;
use std::process::Command;

/// One AT&T statement per line; every form of the table appears at least once (checked).
const SENSITIVE: &[&str] = &[
    "cli",
    "sti",
    "pushf",
    "pushfq",
    "pushfw",
    "popf",
    "popfq",
    "popfw",
    "iret",
    "iretq",
    "iretl",
    "iretw",
    "mov %cr0,%rax",
    "movq %rax,%cr3",
    "mov %cr8,%rax",
    "movq %dr7,%rax",
    "mov %rax,%dr0",
    "movl %ds,%eax",
    "movw %ax,%ss",
    "mov %es,(%rax)",
    "movq %fs,%rax",
    "clts",
    "lmsw %ax",
    "lmsww (%rax)",
    "smsw %eax",
    "smsww (%rax)",
    "smswl %eax",
    "smswq %rax",
    "push %fs",
    "pushq %gs",
    "pushw %fs",
    "pop %fs",
    "popq %gs",
    "popw %gs",
    "lgdt (%rax)",
    "lgdtq (%rax)",
    "lidt (%rax)",
    "lidtq 8(%rdi)",
    "lldt %ax",
    "lldtw (%rax)",
    "ltr %ax",
    "ltrw (%rax)",
    "sgdt (%rax)",
    "sgdtq (%rax)",
    "sidt (%rax)",
    "sidtq (%rax)",
    "sldt %eax",
    "sldtw (%rax)",
    "sldtl %eax",
    "sldtq %rax",
    "str %eax",
    "strw (%rax)",
    "strl %eax",
    "strq %rax",
    "lar %ax,%eax",
    "larw %ax,%ax",
    "larl %eax,%eax",
    "larq %rax,%rax",
    "lsl %ax,%eax",
    "lslw %ax,%ax",
    "lsll %eax,%eax",
    "lslq %rax,%rax",
    "verr %ax",
    "verrw (%rax)",
    "verw %ax",
    "verww (%rax)",
    "lcall *(%rax)",
    "lcalll *(%rax)",
    "lcallw *(%rax)",
    "ljmp *(%rax)",
    "ljmpl *(%rax)",
    "ljmpw *(%rax)",
    "lret",
    "lretq",
    "lretl",
    "lretw",
    "lret $8",
    "invlpg (%rax)",
    "invpcid (%rax),%rax",
    "invd",
    "wbinvd",
    "in $0x60,%al",
    "inb $0x60,%al",
    "inw %dx,%ax",
    "inl %dx,%eax",
    "out %al,$0x80",
    "outb %al,%dx",
    "outw %ax,%dx",
    "outl %eax,%dx",
    "ins",
    "insb",
    "insw",
    "insl",
    "rep insb",
    "outs",
    "outsb",
    "outsw",
    "outsl",
    "rep outsw",
    "rdmsr",
    "wrmsr",
    "cpuid",
    "rdpmc",
    "xsetbv",
    "rdfsbase %rax",
    "rdgsbase %eax",
    "wrfsbase %rax",
    "wrgsbase %rax",
    "swapgs",
    "hlt",
    "sysret",
    "sysretq",
    "sysretl",
    "sysexit",
    "sysexitq",
    "sysexitl",
    "int $0x80",
    "monitor",
    "mwait",
    "vmcall",
    "vmmcall",
];

/// Intel spellings (`.intel_syntax noprefix`), including the Intel-only forms.
const SENSITIVE_INTEL: &[&str] = &[
    "iretd",
    "retf",
    "retfq",
    "retfw",
    "retfd",
    "insd",
    "outsd",
    "mov cr3, rax",
    "mov rax, dr6",
    "mov ds, ax",
    "push fs",
    "in al, dx",
    "out dx, eax",
    "jmp fword ptr [rax]",
    "call fword ptr [rax]",
    "lgdt [rax]",
];

/// Shares a mnemonic with a sensitive form but is ordinary.
const ORDINARY: &[&str] = &[
    "mov %rax,%rbx",
    "movl $1,(%rax)",
    "mov %es:(%rax),%eax",
    "movq %fs:0x28,%rax",
    "push %rax",
    "pushq $1",
    "pop %rbx",
    "popw %ax",
    "jmp *%rax",
    "call *(%rax)",
    "int3",
    "rdtsc",
    "rdtscp",
];

fn assemble(syntax: &str, lines: &[&str]) -> Vec<Vec<u8>> {
    // Each statement in its own section so the bytes of each are known exactly.
    let mut src = format!("{syntax}\n");
    for (i, l) in lines.iter().enumerate() {
        src.push_str(&format!(".section .t{i},\"ax\"\n{l}\n"));
    }
    let dir = std::env::temp_dir().join(format!("previrt-table-{}-{}", std::process::id(), lines.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let (s, o) = (dir.join("t.s"), dir.join("t.o"));
    std::fs::write(&s, src).unwrap();
    let out = Command::new("as")
        .args(["--64", "-o"])
        .arg(&o)
        .arg(&s)
        .output()
        .expect("system `as` (binutils) missing: run scripts/install-deps.sh");
    assert!(out.status.success(), "as failed: {}", String::from_utf8_lossy(&out.stderr));
    let data = std::fs::read(&o).unwrap();
    let elf = previrt_rewriter::elf::Elf::parse(&data).unwrap();
    let bytes =
        (0..lines.len()).map(|i| elf.section_by_name(&format!(".t{i}")).expect("section").data.to_vec()).collect();
    std::fs::remove_dir_all(&dir).ok();
    bytes
}

/// What the text table says about one statement.
fn text_kind(statement: &str) -> (String, Option<Kind>) {
    let mut words = statement.trim().splitn(2, ' ');
    let mut m = words.next().unwrap().to_ascii_lowercase();
    let mut rest = words.next().unwrap_or("").to_string();
    if mnemonics::is_prefix(&m) {
        let mut w = rest.splitn(2, ' ');
        m = w.next().unwrap().to_string();
        rest = w.next().unwrap_or("").to_string();
    }
    let ops: Vec<&str> = if rest.trim().is_empty() { vec![] } else { rest.split(',').collect() };
    let kind = mnemonics::rule(&m).and_then(|r| mnemonics::classify(r, &ops));
    (m, kind)
}

fn check(syntax: &str, lines: &[&str], sensitive: bool) -> BTreeSet<String> {
    let mut forms = BTreeSet::new();
    for (line, bytes) in lines.iter().zip(assemble(syntax, lines)) {
        let instr = Decoder::with_ip(64, &bytes, 0, DecoderOptions::NONE).decode();
        assert_eq!(instr.len(), bytes.len(), "`{line}` assembled to more than one instruction");
        let catalogue = catalogue::classify(&instr).filter(|e| e.patched_by_default).map(|e| e.kind);
        let (form, text) = text_kind(line);
        assert_eq!(text, catalogue, "`{line}`: text table says {text:?}, catalogue says {catalogue:?}");
        assert_eq!(text.is_some(), sensitive, "`{line}`");
        forms.insert(form);
    }
    forms
}

#[test]
fn every_text_form_classifies_like_the_catalogue() {
    let mut seen = check("", SENSITIVE, true);
    seen.extend(check(".intel_syntax noprefix", SENSITIVE_INTEL, true));
    let missing: Vec<_> = mnemonics::all_forms()
        .filter(|(f, rule)| !seen.contains(*f) && !matches!(rule, Rule::FarOperand(_)))
        .map(|(f, _)| f)
        .collect();
    assert!(missing.is_empty(), "forms never assembled by this test: {missing:?}");
}

#[test]
fn ordinary_instructions_with_shared_mnemonics_are_not_flagged() {
    check("", ORDINARY, false);
}

#[test]
fn every_patched_catalogue_kind_has_a_text_form() {
    let text_kinds: BTreeSet<Kind> = SENSITIVE.iter().chain(SENSITIVE_INTEL).filter_map(|l| text_kind(l).1).collect();
    for kind in catalogue::kinds() {
        let patched = catalogue::entries_for(kind).any(|e| e.patched_by_default);
        assert_eq!(text_kinds.contains(&kind), patched, "{}", kind.name());
    }
}

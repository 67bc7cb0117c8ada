//! The text-level table of sensitive instructions: which mnemonic forms (every size suffix,
//! AT&T and Intel spellings) the assembler wrapper turns into sites, and the operand rule that
//! decides for generic mnemonics (`mov`, `push`, `jmp`) whether a statement is sensitive.
//!
//! `rdtsc`/`rdtscp` are deliberately absent: the time class is not patched by default. Forms
//! GNU as rejects in 64-bit code (`pushfl`, `popfd`, `ljmpq`, `rdfsbasel` …) are absent too:
//! only 64-bit code is rewritten.
//! `tests/toolchain_table.rs` assembles every form listed here and checks that the rewriter's
//! catalogue classifies the encoding as the same kind.

use previrt_site_abi::Kind;
use std::collections::HashMap;
use std::sync::OnceLock;

/// How a mnemonic's operands decide whether (and as what) it is sensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Always this kind.
    Fixed(Kind),
    /// `mov` family: sensitive only with a control, debug or segment register operand.
    MovSpecial,
    /// `push`/`pop`: sensitive only when the operand is a segment register.
    SegOperand(Kind),
    /// `jmp`/`call`: sensitive only in the far form (`$sel,$off`, Intel `far`/`fword`).
    FarOperand(Kind),
}

/// Every mnemonic spelling with its rule. One row per kind; names are lowercase.
pub const TABLE: &[(&[&str], Rule)] = {
    use Kind::*;
    use Rule::*;
    &[
        (&["cli"], Fixed(Cli)),
        (&["sti"], Fixed(Sti)),
        (&["pushf", "pushfq", "pushfw"], Fixed(Pushf)),
        (&["popf", "popfq", "popfw"], Fixed(Popf)),
        (&["iret", "iretq", "iretl", "iretw", "iretd"], Fixed(Iret)),
        (&["mov", "movq", "movl", "movw"], MovSpecial),
        (&["clts"], Fixed(Clts)),
        (&["lmsw", "lmsww"], Fixed(Lmsw)),
        (&["smsw", "smsww", "smswl", "smswq"], Fixed(Smsw)),
        (&["push", "pushq", "pushw"], SegOperand(PushSeg)),
        (&["pop", "popq", "popw"], SegOperand(PopSeg)),
        (&["lgdt", "lgdtq"], Fixed(Lgdt)),
        (&["lidt", "lidtq"], Fixed(Lidt)),
        (&["lldt", "lldtw"], Fixed(Lldt)),
        (&["ltr", "ltrw"], Fixed(Ltr)),
        (&["sgdt", "sgdtq"], Fixed(Sgdt)),
        (&["sidt", "sidtq"], Fixed(Sidt)),
        (&["sldt", "sldtw", "sldtl", "sldtq"], Fixed(Sldt)),
        (&["str", "strw", "strl", "strq"], Fixed(Str)),
        (&["lar", "larw", "larl", "larq"], Fixed(Lar)),
        (&["lsl", "lslw", "lsll", "lslq"], Fixed(Lsl)),
        (&["verr", "verrw"], Fixed(Verr)),
        (&["verw", "verww"], Fixed(Verw)),
        (&["lcall", "lcalll", "lcallw"], Fixed(FarCall)),
        (&["call"], FarOperand(FarCall)),
        (&["ljmp", "ljmpl", "ljmpw"], Fixed(FarJmp)),
        (&["jmp"], FarOperand(FarJmp)),
        (&["lret", "lretq", "lretl", "lretw", "retf", "retfq", "retfw", "retfd"], Fixed(FarRet)),
        (&["invlpg"], Fixed(Invlpg)),
        (&["invpcid"], Fixed(Invpcid)),
        (&["invd"], Fixed(Invd)),
        (&["wbinvd"], Fixed(Wbinvd)),
        (&["in", "inb", "inw", "inl"], Fixed(In)),
        (&["out", "outb", "outw", "outl"], Fixed(Out)),
        (&["ins", "insb", "insw", "insl", "insd"], Fixed(Ins)),
        (&["outs", "outsb", "outsw", "outsl", "outsd"], Fixed(Outs)),
        (&["rdmsr"], Fixed(Rdmsr)),
        (&["wrmsr"], Fixed(Wrmsr)),
        (&["cpuid"], Fixed(Cpuid)),
        (&["rdpmc"], Fixed(Rdpmc)),
        (&["xsetbv"], Fixed(Xsetbv)),
        (&["rdfsbase"], Fixed(Rdfsbase)),
        (&["rdgsbase"], Fixed(Rdgsbase)),
        (&["wrfsbase"], Fixed(Wrfsbase)),
        (&["wrgsbase"], Fixed(Wrgsbase)),
        (&["swapgs"], Fixed(Swapgs)),
        (&["hlt"], Fixed(Hlt)),
        (&["sysret", "sysretq", "sysretl"], Fixed(Sysret)),
        (&["sysexit", "sysexitq", "sysexitl"], Fixed(Sysexit)),
        (&["int"], Fixed(Int)),
        (&["monitor"], Fixed(Monitor)),
        (&["mwait"], Fixed(Mwait)),
        (&["vmcall"], Fixed(Vmcall)),
        (&["vmmcall"], Fixed(Vmmcall)),
    ]
};

/// Instruction prefixes GNU as accepts as separate words before a mnemonic (`rep outsb`,
/// `rep; insb`, `lock`, `data16`, `rex64`, segment prefixes, `{disp32}`-style pseudo prefixes).
const PREFIXES: &[&str] = &[
    "rep", "repe", "repz", "repne", "repnz", "lock", "data16", "data32", "addr16", "addr32", "rex", "rex64", "notrack",
    "bnd", "xacquire", "xrelease", "cs", "ds", "es", "fs", "gs", "ss",
];

fn index() -> &'static HashMap<&'static str, Rule> {
    static INDEX: OnceLock<HashMap<&'static str, Rule>> = OnceLock::new();
    INDEX.get_or_init(|| TABLE.iter().flat_map(|(names, rule)| names.iter().map(move |n| (*n, *rule))).collect())
}

/// The rule for a lowercase mnemonic, if it can be sensitive.
pub fn rule(mnemonic: &str) -> Option<Rule> {
    index().get(mnemonic).copied()
}

/// Whether a lowercase word is an instruction prefix rather than a mnemonic.
pub fn is_prefix(word: &str) -> bool {
    PREFIXES.contains(&word) || word.starts_with("rex.") || (word.starts_with('{') && word.ends_with('}'))
}

/// A register operand's name without `%`, lowercase; `None` if the operand is not a bare register.
fn bare_register(op: &str) -> Option<String> {
    let op = op.trim();
    let op = op.strip_prefix('%').unwrap_or(op);
    (!op.is_empty() && op.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| op.to_ascii_lowercase())
}

const SEGMENT_REGISTERS: &[&str] = &["es", "cs", "ss", "ds", "fs", "gs"];

fn numbered(reg: &str, stems: &[&str]) -> bool {
    stems.iter().any(|s| reg.strip_prefix(s).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
}

/// Decide the kind of a statement from its rule and its operand text (`operands` split at
/// top-level commas by the caller).
pub fn classify(rule: Rule, operands: &[&str]) -> Option<Kind> {
    let regs = || operands.iter().filter_map(|o| bare_register(o));
    match rule {
        Rule::Fixed(kind) => Some(kind),
        Rule::MovSpecial => regs().find_map(|r| {
            if numbered(&r, &["cr"]) {
                Some(Kind::MovCr)
            } else if numbered(&r, &["dr", "db"]) {
                Some(Kind::MovDr)
            } else {
                SEGMENT_REGISTERS.contains(&r.as_str()).then_some(Kind::MovSeg)
            }
        }),
        Rule::SegOperand(kind) => {
            (operands.len() == 1 && regs().any(|r| SEGMENT_REGISTERS.contains(&r.as_str()))).then_some(kind)
        }
        Rule::FarOperand(kind) => {
            let att_far = operands.len() == 2 && operands.iter().all(|o| o.trim_start().starts_with('$'));
            let intel_far = operands.len() == 1 && {
                let o = operands[0].to_ascii_lowercase();
                o.contains("fword") || o.split_whitespace().next() == Some("far")
            };
            (att_far || intel_far).then_some(kind)
        }
    }
}

/// Every spelling in the table (for the cross-check test and the documentation).
pub fn all_forms() -> impl Iterator<Item = (&'static str, Rule)> {
    TABLE.iter().flat_map(|(names, rule)| names.iter().map(move |n| (*n, *rule)))
}

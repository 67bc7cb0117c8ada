//! The text side of assembler-level pre-virtualization: read GNU as input (AT&T or Intel
//! syntax), find each sensitive instruction in 64-bit code of an executable section, and
//! rewrite its statement into a *site*:
//!
//! ```text
//! 7771: cli ; 7772: ; .nops <pad> ; 7773: ; <save slot> ; <site record> ; .popsection
//! ```
//!
//! The instruction stays where it is; `.nops` adds `max(0, min_site_len - insn_len)` bytes of
//! long NOPs computed by the assembler from the label difference, so no encoder is needed
//! here. Everything is appended to the statement's own line, so line numbers — and with them
//! `.loc`-less debug line info and error messages — never move. Numeric labels are used
//! because they may be redefined, which makes the text safe inside `.macro`/`.rept` bodies.
//! Records are emitted into subsection 1 of `.previrt.sites`; [`Rewriter::finish`] puts the
//! one chunk header of the object in subsection 0, with the count computed by the assembler.
//!
//! Operand fields of the records stay zero here: `crate::objfill` fills them from the
//! assembled bytes. Input the lexer does not understand is left unchanged and reported.

use crate::mnemonics;
use iced_x86::{Decoder, DecoderOptions};
use previrt_annotate::asm::LineAnnotations;
use previrt_rewriter::catalogue;
use previrt_site_abi::{Kind, Producer, ABI_VERSION, CHUNK_MAGIC, RECORD_SIZE, SAVE_SECTION, SITES_SECTION};
use std::collections::{BTreeMap, HashMap};

/// Assembler settings at the start of the input (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Bytes every site must span (the longest replacement the runtime writes).
    pub min_site_len: u8,
    /// `--64` (true) or `--32` (false): the initial code size.
    pub code64: bool,
    /// `-msyntax=intel`.
    pub intel: bool,
}

/// A line the lexer could not make sense of; it was passed through unchanged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unparsed {
    pub line: usize,
    pub reason: &'static str,
}

/// A sensitive statement in 16/32-bit code, left alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Narrow {
    /// `file:line` (`-` for standard input).
    pub at: String,
    pub section: String,
    pub kind: &'static str,
}

/// What the rewriter did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Sites written, by kind name (statements inside `.macro` bodies count once).
    pub sites: BTreeMap<&'static str, u32>,
    /// Of those, statements inside `.macro` bodies (each expansion becomes one site).
    pub macro_sites: u32,
    /// Sensitive statements left alone because they are 16- or 32-bit code.
    pub narrow_code: Vec<Narrow>,
    pub unparsed: Vec<Unparsed>,
}

impl Stats {
    pub fn total(&self) -> u32 {
        self.sites.values().sum()
    }
}

/// Executable sections GNU as or the kernel's linker scripts know by name, used when a
/// `.section` directive gives no flags.
const CODE_SECTIONS: &[&str] = &[
    ".text",
    ".init",
    ".fini",
    ".init.text",
    ".noinstr.text",
    ".entry.text",
    ".altinstr_replacement",
    ".head.text",
    ".ref.text",
    ".sched.text",
    ".cpuidle.text",
    ".meminit.text",
    ".exit.text",
    ".kprobes.text",
    ".irqentry.text",
    ".softirqentry.text",
    ".spinlock.text",
    ".lock.text",
    ".fixup",
    ".static_call.text",
];

fn code_by_name(name: &str) -> bool {
    CODE_SECTIONS.contains(&name) || name.starts_with(".text.")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    name: String,
    code: bool,
}

/// Streaming rewriter: feed every input file in order (GNU as concatenates them), then finish.
pub struct Rewriter {
    cfg: Config,
    out: Vec<u8>,
    stats: Stats,
    current: Section,
    previous: Section,
    stack: Vec<(Section, Section)>,
    known: HashMap<String, bool>,
    code64: bool,
    /// In Intel syntax: the directive that re-enters it (`.intel_syntax noprefix`).
    intel: Option<String>,
    macro_depth: u32,
    /// The macro whose body is being read.
    current_macro: Option<String>,
    /// Macro name (lowercase) → parameter names.
    macros: HashMap<String, Vec<String>>,
    /// (macro, parameter) → the sensitive mnemonics the input passes for it, when the body
    /// uses the parameter as a mnemonic (`1: \op` in Linux's msr-reg.S).
    macro_mnemonics: HashMap<(String, String), Vec<(String, Kind)>>,
    in_block_comment: bool,
    file: String,
    line_no: usize,
    /// Source lines whose memory accesses become sites (`previrt annotate`).
    annotations: Option<LineAnnotations>,
}

impl Rewriter {
    pub fn new(cfg: Config) -> Rewriter {
        let text = Section { name: ".text".into(), code: true };
        Rewriter {
            cfg,
            out: Vec::new(),
            stats: Stats::default(),
            current: text.clone(),
            previous: text,
            stack: Vec::new(),
            known: HashMap::new(),
            code64: cfg.code64,
            intel: cfg.intel.then(|| ".intel_syntax".to_string()),
            macro_depth: 0,
            current_macro: None,
            macros: HashMap::new(),
            macro_mnemonics: HashMap::new(),
            in_block_comment: false,
            file: String::new(),
            line_no: 0,
            annotations: None,
        }
    }

    /// Also make sites of the loads/stores at these annotated source lines.
    pub fn with_annotations(mut self, a: LineAnnotations) -> Rewriter {
        self.annotations = Some(a);
        self
    }

    /// Rewrite one input file. `name`, when given, is announced with a line marker so that
    /// the real assembler, reading the result from a pipe, still names the file in its
    /// messages and debug info.
    pub fn feed(&mut self, name: Option<&str>, input: &[u8]) {
        if let Some(name) = name {
            self.out
                .extend_from_slice(format!("# 1 \"{}\"\n", name.replace('\\', "\\\\").replace('"', "\\\"")).as_bytes());
        }
        self.line_no = 0;
        self.file = name.unwrap_or("-").to_string();
        self.out.reserve(input.len() + input.len() / 16);
        self.prescan(input);
        for line in input.split_inclusive(|&b| b == b'\n') {
            self.line_no += 1;
            self.line(line);
        }
        if !input.is_empty() && !input.ends_with(b"\n") {
            self.out.push(b'\n');
        }
    }

    /// The rewritten text (with the chunk header when any site was written) and the stats.
    pub fn finish(mut self) -> (Vec<u8>, Stats) {
        if self.stats.total() > 0 {
            // At the end of the input switching syntax is harmless; the header needs AT&T.
            let syntax = if self.intel.is_some() { ".att_syntax prefix ; " } else { "" };
            self.out.extend_from_slice(
                format!(
                    "{syntax}.pushsection {SITES_SECTION},\"a\",@progbits ; .subsection 1 ; 7775: ; \
                     .subsection 0 ; .balign 4 ; .long {CHUNK_MAGIC:#x} ; .short {ABI_VERSION}, {RECORD_SIZE} ; \
                     .long (7775b-7776f)/{RECORD_SIZE} ; .short {}, 0 ; 7776: ; .popsection\n",
                    Producer::Assembler as u16
                )
                .as_bytes(),
            );
        }
        (self.out, self.stats)
    }

    /// First pass: which sensitive mnemonics are passed to which macro parameters, so that a
    /// body statement `\op` can become a site for exactly those (`.ifc` in the body). A body
    /// that passes its own parameter on (`INNER \op` inside `.macro OUTER op`) hands INNER's
    /// parameter every mnemonic OUTER's gets, through any depth of forwarding.
    fn prescan(&mut self, input: &[u8]) {
        let mut in_comment = false;
        let mut enclosing: Option<String> = None;
        // (OUTER, its parameter) -> (INNER, the parameter it is passed to).
        let mut forwards: Vec<((String, String), (String, String))> = Vec::new();
        for line in input.split_inclusive(|&b| b == b'\n') {
            let Some(lexed) = lex_line(line, &mut in_comment) else { continue };
            for st in &lexed.statements {
                let Ok(text) = std::str::from_utf8(&line[st.start..st.end]) else { continue };
                let (word, rest) = split_word(&text[skip_labels(text)..]);
                let word = word.to_ascii_lowercase();
                if word == ".macro" {
                    let (name, params) = split_word(rest);
                    let params = macro_words(params)
                        .iter()
                        .map(|p| p.split(['=', ':']).next().unwrap_or("").to_string())
                        .collect();
                    enclosing = Some(name.to_ascii_lowercase());
                    self.macros.insert(name.to_ascii_lowercase(), params);
                } else if word == ".endm" {
                    enclosing = None;
                } else if let Some(params) = self.macros.get(&word) {
                    for (i, arg) in macro_words(rest).iter().enumerate() {
                        let (param, value) = match arg.split_once('=') {
                            Some((k, v)) => (k.trim().to_string(), v.trim()),
                            None => (params.get(i).cloned().unwrap_or_default(), *arg),
                        };
                        let value = value.trim_matches('"');
                        if let (Some(outer), Some(own)) = (&enclosing, value.strip_prefix('\\')) {
                            let own = own.trim_end_matches("\\()").to_string();
                            forwards.push(((outer.clone(), own), (word.clone(), param)));
                        } else if let Some(mnemonics::Rule::Fixed(kind)) = mnemonics::rule(&value.to_ascii_lowercase())
                        {
                            add_choice(&mut self.macro_mnemonics, (word.clone(), param), (value.to_string(), kind));
                        }
                    }
                }
            }
        }
        // Forwarded parameters get what the forwarding one gets, until nothing changes.
        let mut changed = true;
        while changed {
            changed = false;
            for (from, to) in &forwards {
                for choice in self.macro_mnemonics.get(from).cloned().unwrap_or_default() {
                    changed |= add_choice(&mut self.macro_mnemonics, to.clone(), choice);
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(a) = &mut self.annotations {
            a.input_line(line);
        }
        let Some(lexed) = lex_line(line, &mut self.in_block_comment) else {
            self.stats.unparsed.push(Unparsed { line: self.line_no, reason: "unterminated string" });
            self.out.extend_from_slice(line);
            return;
        };
        // Statements consisting only of prefixes (`rep;`) bind to the next statement.
        let mut pending_prefix: Option<usize> = None;
        let mut edits: Vec<(usize, usize, Edit)> = Vec::new(); // (insert label at, append after, what)
        for st in &lexed.statements {
            let text = &line[st.start..st.end];
            match self.statement(text) {
                Parsed::PrefixOnly(at) => pending_prefix = Some(pending_prefix.unwrap_or(st.start + at)),
                Parsed::Site(at, kind) => {
                    edits.push((pending_prefix.take().unwrap_or(st.start + at), st.end, Edit::Site(kind)));
                }
                Parsed::MacroParam(at, param, choices) => {
                    edits.push((st.start + at, st.end, Edit::Choice(param, choices)));
                    pending_prefix = None;
                }
                Parsed::Other => pending_prefix = None,
            }
        }
        if edits.is_empty() {
            self.out.extend_from_slice(line);
            return;
        }
        let mut pos = 0;
        for (label_at, end, edit) in edits {
            self.out.extend_from_slice(&line[pos..label_at]);
            let statement = &line[label_at..end];
            match edit {
                Edit::Site(kind) => {
                    self.out.extend_from_slice(b"7771: ");
                    self.out.extend_from_slice(statement);
                    self.site_suffix(kind);
                }
                // `.ifc \op,rdmsr ; 7771: \op … site … ; .else ; … ; \op ; .endif …`
                Edit::Choice(param, choices) => {
                    for (mnemonic, kind) in &choices {
                        self.out.extend_from_slice(format!(".ifc \\{param},{mnemonic} ; 7771: ").as_bytes());
                        self.out.extend_from_slice(statement);
                        self.site_suffix(*kind);
                        self.out.extend_from_slice(b" ; .else ; ");
                    }
                    self.out.extend_from_slice(statement);
                    self.out.extend_from_slice(" ; .endif".repeat(choices.len()).as_bytes());
                }
            }
            pos = end;
        }
        self.out.extend_from_slice(&line[pos..]);
    }

    /// The text appended after a sensitive instruction: padding, save slot, record.
    fn site_suffix(&mut self, kind: Kind) {
        let m = self.cfg.min_site_len;
        // The record directives use AT&T expressions; re-enter Intel syntax afterwards.
        let (to_att, back) = match &self.intel {
            None => ("", String::new()),
            Some(d) => (" ; .att_syntax prefix", format!(" ; {d}")),
        };
        let k = kind as u16;
        let s = format!(
            " ; 7772: ; .nops -((7772b-7771b) < {m}) * ({m}-(7772b-7771b)) ; 7773:{to_att} ; \
             .pushsection {SAVE_SECTION},\"aw\",@progbits ; 7774: .skip 7772b-7771b ; .popsection ; \
             .pushsection {SITES_SECTION},\"a\",@progbits ; .subsection 1 ; \
             .long 7771b-., 7774b-. ; .short {k}, 0 ; .byte 7773b-7771b, 7772b-7771b, 0, 0, 0, 0, 0, 0 ; \
             .long 0, 7773b-., 7771b-. ; .popsection{back}"
        );
        self.out.extend_from_slice(s.as_bytes());
        *self.stats.sites.entry(kind.name()).or_default() += 1;
        if self.macro_depth > 0 {
            self.stats.macro_sites += 1;
        }
    }

    fn statement(&mut self, text: &[u8]) -> Parsed {
        let Ok(text) = std::str::from_utf8(text) else { return Parsed::Other };
        let body_at = skip_labels(text);
        let body = &text[body_at..];
        let (word, mut rest) = split_word(body);
        if word.is_empty() {
            return Parsed::Other;
        }
        if word.starts_with('.') {
            let directive = word.to_ascii_lowercase();
            if directive == ".byte" {
                if let Some(kind) = byte_encoded(rest) {
                    return self.site_here(body_at, kind);
                }
            }
            self.directive(&directive, rest);
            return Parsed::Other;
        }
        if let (Some(param), Some(m)) = (word.strip_prefix('\\'), &self.current_macro) {
            let param = param.trim_end_matches("\\()").to_string();
            if let Some(choices) = self.macro_mnemonics.get(&(m.clone(), param.clone())) {
                return Parsed::MacroParam(body_at, param, choices.clone());
            }
        }
        let mut word = word.to_ascii_lowercase();
        while mnemonics::is_prefix(&word) {
            let (next, after) = split_word(rest);
            if next.is_empty() {
                return Parsed::PrefixOnly(body_at);
            }
            word = next.to_ascii_lowercase();
            rest = after;
        }
        let rule = mnemonics::rule(&word);
        // Most statements are neither: keep them on the cheap path.
        if rule.is_none() && self.annotations.is_none() || rest.trim_start().starts_with('=') {
            return Parsed::Other; // (`cli = 3` is a symbol assignment)
        }
        let ops = split_operands(rest);
        let annotated = || self.annotations.as_ref().filter(|_| self.intel.is_none())?.memory_site(&word, &ops);
        let Some(kind) = rule.and_then(|r| mnemonics::classify(r, &ops)).or_else(annotated) else {
            return Parsed::Other;
        };
        self.site_here(body_at, kind)
    }

    /// A sensitive instruction at `body_at` of the statement: a site if this is 64-bit code.
    fn site_here(&mut self, body_at: usize, kind: Kind) -> Parsed {
        if self.macro_depth == 0 && !self.current.code {
            return Parsed::Other;
        }
        if !self.code64 {
            let at = format!("{}:{}", self.file, self.line_no);
            self.stats.narrow_code.push(Narrow { at, section: self.current.name.clone(), kind: kind.name() });
            return Parsed::Other;
        }
        Parsed::Site(body_at, kind)
    }

    fn directive(&mut self, name: &str, args: &str) {
        if let Some(a) = &mut self.annotations {
            a.directive(name, args);
        }
        match name {
            ".macro" => {
                self.macro_depth += 1;
                self.current_macro = Some(split_word(args).0.to_ascii_lowercase());
            }
            ".endm" => {
                self.macro_depth = self.macro_depth.saturating_sub(1);
                if self.macro_depth == 0 {
                    self.current_macro = None;
                }
            }
            ".code16" | ".code16gcc" | ".code32" => self.code64 = false,
            ".code64" => self.code64 = true,
            ".intel_syntax" => self.intel = Some(format!(".intel_syntax {}", args.trim())),
            ".att_syntax" => self.intel = None,
            // Section directives inside a macro body take effect where it is expanded.
            _ if self.macro_depth > 0 => {}
            ".text" | ".data" | ".bss" => self.switch(name, None),
            ".section" | ".sect" => {
                let (sec, flags) = section_args(args);
                self.switch(&sec, flags.as_deref());
            }
            ".pushsection" => {
                self.stack.push((self.current.clone(), self.previous.clone()));
                let (sec, flags) = section_args(args);
                self.switch(&sec, flags.as_deref());
            }
            ".popsection" => {
                if let Some((cur, prev)) = self.stack.pop() {
                    self.current = cur;
                    self.previous = prev;
                }
            }
            ".previous" => std::mem::swap(&mut self.current, &mut self.previous),
            _ => {}
        }
    }

    fn switch(&mut self, name: &str, flags: Option<&str>) {
        let code = match flags {
            Some(f) => f.contains('x') || f.contains("#execinstr"),
            None => *self.known.get(name).unwrap_or(&code_by_name(name)),
        };
        self.known.entry(name.to_string()).or_insert(code);
        let next = Section { name: name.to_string(), code };
        self.previous = std::mem::replace(&mut self.current, next);
    }
}

/// The kind of a `.byte` statement that spells exactly one sensitive instruction with literal
/// numbers (`.byte 0x0f, 0x01, 0xc8` is `monitor`, as Linux writes it for old assemblers).
fn byte_encoded(operands: &str) -> Option<Kind> {
    let bytes: Vec<u8> = split_operands(operands).iter().map(|o| parse_byte(o)).collect::<Option<_>>()?;
    if bytes.is_empty() || bytes.len() > 15 {
        return None;
    }
    let instr = Decoder::with_ip(64, &bytes, 0, DecoderOptions::NONE).decode();
    let entry = catalogue::classify(&instr).filter(|e| e.patched_by_default)?;
    (instr.len() == bytes.len()).then_some(entry.kind)
}

/// A GNU as integer literal (hex, octal, binary, decimal) that fits a byte.
fn parse_byte(lit: &str) -> Option<u8> {
    let l = lit.trim().to_ascii_lowercase();
    let v = if let Some(h) = l.strip_prefix("0x") {
        u32::from_str_radix(h, 16).ok()?
    } else if let Some(b) = l.strip_prefix("0b") {
        u32::from_str_radix(b, 2).ok()?
    } else if l.len() > 1 && l.starts_with('0') {
        u32::from_str_radix(&l[1..], 8).ok()?
    } else {
        l.parse().ok()?
    };
    u8::try_from(v).ok()
}

enum Parsed {
    /// A sensitive instruction; the site label goes at this byte offset of the statement.
    Site(usize, Kind),
    /// A macro-body statement whose mnemonic is this parameter, passed these mnemonics.
    MacroParam(usize, String, Vec<(String, Kind)>),
    /// Only prefixes (and labels); the label would go at this offset.
    PrefixOnly(usize),
    Other,
}

enum Edit {
    Site(Kind),
    Choice(String, Vec<(String, Kind)>),
}

/// Record that `choice` is passed for a macro parameter; whether it is new.
fn add_choice(
    choices: &mut HashMap<(String, String), Vec<(String, Kind)>>,
    param: (String, String),
    choice: (String, Kind),
) -> bool {
    let seen = choices.entry(param).or_default();
    let new = !seen.iter().any(|(m, _)| *m == choice.0);
    if new {
        seen.push(choice);
    }
    new
}

/// Macro parameters or arguments: separated by commas, or by blanks when there is no comma.
fn macro_words(text: &str) -> Vec<&str> {
    let text = text.trim();
    if text.is_empty() {
        Vec::new()
    } else if text.contains(',') {
        split_operands(text)
    } else {
        text.split_whitespace().collect()
    }
}

struct Span {
    start: usize,
    end: usize,
}

struct Lexed {
    statements: Vec<Span>,
}

/// Split a line into `;`-separated statements, skipping strings, character constants and
/// comments (`#…`, `/* … */` possibly spanning lines, `/` at the start of a line).
/// `None` when a string is not terminated on the line.
fn lex_line(line: &[u8], in_block_comment: &mut bool) -> Option<Lexed> {
    let mut statements = Vec::new();
    let mut i = 0;
    let mut start = 0;
    let n = line.len();
    let content_end = |s: usize, e: usize, v: &mut Vec<Span>| {
        if e > s {
            v.push(Span { start: s, end: e });
        }
    };
    if !*in_block_comment {
        let first = line.iter().position(|b| !b.is_ascii_whitespace());
        if let Some(f) = first {
            if line[f] == b'/' && line.get(f + 1) != Some(&b'*') {
                return Some(Lexed { statements });
            }
        }
    }
    while i < n {
        if *in_block_comment {
            match find(&line[i..], b"*/") {
                Some(p) => {
                    *in_block_comment = false;
                    i += p + 2;
                    start = i;
                    continue;
                }
                None => return Some(Lexed { statements }),
            }
        }
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    match line.get(i) {
                        None | Some(b'\n') => return None,
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            // A character constant: 'c or '\c (GNU as needs no closing quote).
            b'\'' => i += if line.get(i + 1) == Some(&b'\\') { 3 } else { 2 },
            b'#' => {
                content_end(start, i, &mut statements);
                return Some(Lexed { statements });
            }
            b'/' if line.get(i + 1) == Some(&b'*') => {
                content_end(start, i, &mut statements);
                *in_block_comment = true;
                i += 2;
            }
            b';' | b'\n' => {
                content_end(start, i, &mut statements);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    content_end(start, n.min(i), &mut statements);
    Some(Lexed { statements })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_symbol_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$')
}

/// Byte offset of the first non-label token (labels are `name:` possibly repeated).
fn skip_labels(text: &str) -> usize {
    let mut at = 0;
    loop {
        let rest = &text[at..];
        let ws = rest.len() - rest.trim_start().len();
        let rest = &rest[ws..];
        let ident = rest.find(|c: char| !is_symbol_char(c)).unwrap_or(rest.len());
        if ident > 0 && rest[ident..].starts_with(':') && !rest[ident..].starts_with("::") {
            at += ws + ident + 1;
        } else {
            return at + ws;
        }
    }
}

/// First whitespace-delimited word of `text` and the rest.
fn split_word(text: &str) -> (&str, &str) {
    let t = text.trim_start();
    let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
    (&t[..end], &t[end..])
}

/// Operands split at top-level commas (not inside parentheses, brackets or strings).
fn split_operands(text: &str) -> Vec<&str> {
    let text = text.trim();
    if text.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let (mut depth, mut start, mut in_str) = (0i32, 0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '(' | '[' if !in_str => depth += 1,
            ')' | ']' if !in_str => depth -= 1,
            ',' if !in_str && depth == 0 => {
                out.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(text[start..].trim());
    out
}

/// `.section NAME[, "flags"[, @type…]]` and `.pushsection NAME[, SUBSECTION][, "flags"…]`.
fn section_args(args: &str) -> (String, Option<String>) {
    let ops = split_operands(args);
    let name = ops.first().map(|n| n.trim_matches('"').to_string()).unwrap_or_default();
    let flags = ops[1.min(ops.len())..]
        .iter()
        .find(|o| o.starts_with('"') || o.starts_with('#'))
        .map(|f| f.trim_matches('"').to_string());
    (name, flags)
}

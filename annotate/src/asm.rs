//! Emission for the assembler path: which statements of GNU as input are annotated memory
//! accesses. The toolchain's `as` feeds every input line to [`LineAnnotations::input_line`]
//! and every directive to [`LineAnnotations::directive`] (`.file`/`.loc` give the source line
//! of compiled C; preprocessed `.S` input has cpp line markers `# N "file"` instead) and asks
//! [`LineAnnotations::memory_site`] about each instruction; a yes makes the statement a site
//! exactly like a sensitive instruction (padding, save slot, record), its operand fields
//! filled after assembly by [`crate::insn::MemAccess::record`].
//!
//! The annotations come from `previrt annotate -o FILE` (by `file:line`), handed over by
//! `x86_64-previrt-linux-gnu-gcc --annotations FILE` or the environment variable
//! [`ENV`]; FILE may also be a `previrt run --profile` trace, from which they are derived in
//! the same step.

use crate::rules::Target;
use anyhow::{Context, Result};
use previrt_site_abi::Kind;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// Environment variable naming the annotations file for `as`.
pub const ENV: &str = "PREVIRT_ANNOTATIONS";

/// AT&T mnemonics (prefixes) whose memory operand is not a data access of the kind
/// annotated, and those that only read a destination-last memory operand.
const NOT_ACCESS: &[&str] = &["lea", "nop", "prefetch", "call", "jmp", "push", "pop", "clflush", "invlpg", "j"];
const READS_DESTINATION: &[&str] = &["cmp", "test", "bt"];

#[derive(Deserialize)]
struct FileForm {
    accesses: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    file: Option<String>,
    line: Option<u32>,
    kind: String,
}

/// Annotated source lines, and the position in the assembler input.
#[derive(Debug, Default)]
pub struct LineAnnotations {
    /// Line → `(file, target)` for every annotated access on it.
    by_line: HashMap<u32, Vec<(String, Target)>>,
    /// `.file` numbers of the input.
    files: HashMap<u32, String>,
    /// `(file number, line)` of the last `.loc`.
    at: Option<(u32, u32)>,
    /// `(file, line)` of the current input line after a cpp line marker.
    marked: Option<(String, u32)>,
}

impl LineAnnotations {
    /// The annotations named by [`ENV`], if it is set.
    pub fn from_env() -> Option<Result<LineAnnotations>> {
        std::env::var_os(ENV).map(|p| LineAnnotations::read(Path::new(&p)))
    }

    /// An annotations file, or a `previrt run --profile` trace (derived with
    /// [`crate::annotations_from_profile`]).
    pub fn read(path: &Path) -> Result<LineAnnotations> {
        let mut text = std::fs::read(path).with_context(|| format!("cannot read annotations {}", path.display()))?;
        if let Some(head) = crate::profile::Head::of_profile(&text) {
            text = crate::annotations_from_profile(path, &text, head)?;
        }
        let f: FileForm = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a previrt annotations file", path.display()))?;
        let mut a = LineAnnotations::default();
        for e in f.accesses {
            let (Some(file), Some(line)) = (e.file, e.line) else { continue };
            let target = if e.kind.starts_with("mmio") { Target::Mmio } else { Target::PageTable };
            a.by_line.entry(line).or_default().push((file, target));
        }
        Ok(a)
    }

    /// One line of the assembler input, before its statements: a cpp line marker
    /// (`# N "file" flags…`) says the next line is line N of file; any other line advances.
    pub fn input_line(&mut self, line: &[u8]) {
        match line_marker(line) {
            Some((line, file)) => self.marked = Some((file, line.saturating_sub(1))),
            None => {
                if let Some((_, l)) = &mut self.marked {
                    *l += 1;
                }
            }
        }
    }

    /// Track `.file N ["dir"] "name"` and `.loc N LINE …`.
    pub fn directive(&mut self, name: &str, args: &str) {
        let mut words = args.split_whitespace();
        let Some(n) = words.next().and_then(|w| w.parse::<u32>().ok()) else { return };
        match name {
            ".file" => {
                let quoted: Vec<&str> = args.split('"').skip(1).step_by(2).collect();
                let path = match quoted[..] {
                    [dir, name, ..] if !name.starts_with('/') => format!("{dir}/{name}"),
                    [_, name, ..] | [name] => name.to_string(),
                    [] => return,
                };
                self.files.insert(n, path);
            }
            ".loc" => self.at = words.next().and_then(|l| l.parse().ok()).map(|l| (n, l)),
            _ => {}
        }
    }

    /// The site kind for an AT&T statement `mnemonic operands…` at the current line, if the
    /// line is annotated and the statement loads or stores through a memory operand.
    pub fn memory_site(&self, mnemonic: &str, operands: &[&str]) -> Option<Kind> {
        // `.loc` (compiled C) is exact; line markers place the statements of `.S` input.
        let (file, line) = match self.at {
            Some((file_no, line)) => (self.files.get(&file_no)?.as_str(), line),
            None => self.marked.as_ref().map(|(f, l)| (f.as_str(), *l))?,
        };
        let &(_, target) = self.by_line.get(&line)?.iter().find(|(f, _)| same_file(f, file))?;
        if NOT_ACCESS.iter().any(|p| mnemonic.starts_with(p)) {
            return None;
        }
        let mem = operands.iter().position(|o| o.contains('(') && !o.contains("%rsp") && !o.starts_with('*'))?;
        let reads_dest = READS_DESTINATION.iter().any(|p| mnemonic.starts_with(p)) && !mnemonic.starts_with("cmpxchg");
        let write = mem + 1 == operands.len() && !reads_dest;
        Some(match (target, write) {
            (Target::Mmio, false) => Kind::MmioRead,
            (Target::Mmio, true) => Kind::MmioWrite,
            (Target::PageTable, false) => Kind::PtRead,
            (Target::PageTable, true) => Kind::PtWrite,
        })
    }
}

/// `(line, file)` of a cpp line marker `# N "file" [flags]` (or `#line N "file"`).
fn line_marker(line: &[u8]) -> Option<(u32, String)> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let rest = text.strip_prefix('#')?;
    let rest = rest.strip_prefix("line").unwrap_or(rest).trim_start();
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let line = rest[..digits].parse().ok()?;
    let file = rest[digits..].trim_start().strip_prefix('"')?.split('"').next()?;
    Some((line, file.to_string()))
}

/// Equal paths, or one ends with the other at a `/` (DWARF and `.file` may differ in how
/// much of the directory they spell).
fn same_file(a: &str, b: &str) -> bool {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    long == short || long.strip_suffix(short).is_some_and(|p| p.ends_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotated() -> LineAnnotations {
        let mut a = LineAnnotations::default();
        a.by_line.insert(13, vec![("/src/include/io.h".into(), Target::Mmio)]);
        a.by_line.insert(20, vec![("/src/include/mm.h".into(), Target::PageTable)]);
        a.directive(".file", r#"0 "/src" "/src/x.c""#);
        a.directive(".file", r#"4 "/src/include/io.h""#);
        a.directive(".file", r#"5 "include" "mm.h""#);
        a
    }

    #[test]
    fn loads_and_stores_on_annotated_lines_only() {
        let mut a = annotated();
        a.directive(".loc", "4 13 2 is_stmt 0");
        assert_eq!(a.memory_site("movl", &["48(%rax)", "%edx"]), Some(Kind::MmioRead));
        assert_eq!(a.memory_site("movl", &["%edx", "(%rax)"]), Some(Kind::MmioWrite));
        assert_eq!(a.memory_site("cmpl", &["$1", "(%rax)"]), Some(Kind::MmioRead));
        assert_eq!(a.memory_site("leaq", &["8(%rax)", "%rdx"]), None);
        assert_eq!(a.memory_site("movl", &["%edx", "8(%rsp)"]), None);
        assert_eq!(a.memory_site("movl", &["%edx", "%eax"]), None);
        a.directive(".loc", "5 20 1");
        assert_eq!(a.memory_site("movq", &["%rbx", "(%rax)"]), Some(Kind::PtWrite));
        a.directive(".loc", "4 14 1");
        assert_eq!(a.memory_site("movl", &["48(%rax)", "%edx"]), None);
        a.directive(".loc", "1 13 1");
        assert_eq!(a.memory_site("movl", &["48(%rax)", "%edx"]), None, "line 13 of another file");
    }

    #[test]
    fn cpp_line_markers_place_preprocessed_assembly() {
        let mut a = annotated();
        let feed = |a: &mut LineAnnotations, line: &str| a.input_line(line.as_bytes());
        feed(&mut a, "# 18 \"/src/include/mm.h\" 1\n");
        feed(&mut a, "\n"); // line 18
        assert_eq!(a.memory_site("movq", &["%rbx", "(%rax)"]), None);
        feed(&mut a, "  movq %rbx, (%rax)\n"); // line 19
        assert_eq!(a.memory_site("movq", &["%rbx", "(%rax)"]), None);
        feed(&mut a, "  movq %rbx, (%rax)\n"); // line 20
        assert_eq!(a.memory_site("movq", &["%rbx", "(%rax)"]), Some(Kind::PtWrite));
        feed(&mut a, "#line 13 \"/src/include/io.h\"\n");
        feed(&mut a, "movl 48(%rax), %edx\n");
        assert_eq!(a.memory_site("movl", &["48(%rax)", "%edx"]), Some(Kind::MmioRead));
        feed(&mut a, "# a comment, not a marker\n");
        assert_eq!(a.memory_site("movl", &["48(%rax)", "%edx"]), None, "line 14");
        // Compiled C's `.loc` wins over markers.
        a.directive(".loc", "5 20 1");
        assert_eq!(a.memory_site("movl", &["48(%rax)", "%edx"]), Some(Kind::PtRead));
    }
}

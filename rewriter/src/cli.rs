//! `previrt scan PATH...`: count, list or export the sensitive instructions of ELF files.
//!
//! The root `previrt` binary only parses [`ScanArgs`] and calls [`run`]. The JSON schema is
//! documented in `docs/scan-json.md`; [`SCHEMA`] names its version.

use crate::elf::{is_elf, Elf, SymbolSource};
use crate::scan::{scan_elf, Hit};
use crate::sites;
use rayon::prelude::*;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// Version tag of the JSON output (`"schema"` field).
pub const SCHEMA: &str = "previrt-scan/1";

/// Exit status when any input was bad.
pub const EXIT_BAD_INPUT: i32 = 2;

/// Arguments of `previrt scan`.
#[derive(clap::Args, Debug, Clone)]
pub struct ScanArgs {
    /// ELF files (vmlinux, .o, .ko, executables) or directories to walk recursively.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Print every sensitive instruction: file, section, offset, address, function+offset,
    /// bytes, AT&T disassembly, kind (tab-separated), then the summary.
    #[arg(long)]
    pub list: bool,
    /// Print JSON (schema in docs/scan-json.md) instead of tables. With --list, includes every
    /// hit.
    #[arg(long)]
    pub json: bool,
    /// Worker threads for many files (default: one per core).
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<usize>,
}

/// Kind name → count, serialized as a JSON object in catalogue (kind-number) order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(pub Vec<(&'static str, u64)>);

impl Counts {
    fn add(&mut self, name: &'static str, n: u64) {
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some((_, c)) => *c += n,
            None => self.0.push((name, n)),
        }
    }
    fn sort(&mut self) {
        self.0.sort_by_key(|(k, _)| previrt_site_abi::Kind::from_name(k).map(|k| k as u16).unwrap_or(u16::MAX));
    }
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
    pub fn get(&self, name: &str) -> u64 {
        self.0.iter().find(|(k, _)| *k == name).map(|(_, n)| *n).unwrap_or(0)
    }
}

impl Serialize for Counts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Per executable section.
#[derive(Debug, Clone, Serialize)]
pub struct SectionReport {
    pub index: usize,
    pub name: String,
    /// Virtual address (hex string), linked images only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub size: u64,
    pub total: u64,
    pub counts: Counts,
}

/// A 16/32-bit code region.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    pub section: String,
    pub start: u64,
    pub end: u64,
    pub bits: u32,
    pub reason: String,
}

/// One sensitive instruction.
#[derive(Debug, Clone, Serialize)]
pub struct HitReport {
    pub section: String,
    pub offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub function: Option<String>,
    pub bytes: String,
    pub asm: String,
    pub kind: &'static str,
    pub class: &'static str,
    pub patched_by_default: bool,
    pub bits: u32,
}

/// One uncovered sensitive instruction (files with a site table).
#[derive(Debug, Clone, Serialize)]
pub struct UncoveredReport {
    pub section: String,
    pub offset: u64,
    pub function: Option<String>,
    pub kind: &'static str,
    pub reason: &'static str,
    pub detail: String,
}

/// Everything `scan` reports about one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub path: String,
    pub elf_type: &'static str,
    pub symbols: &'static str,
    pub exec_bytes: u64,
    pub total: u64,
    pub counts: Counts,
    pub sections: Vec<SectionReport>,
    pub regions: Vec<RegionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sites: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covered: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncovered: Option<Vec<UncoveredReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits: Option<Vec<HitReport>>,
}

/// A file that could not be scanned.
#[derive(Debug, Clone, Serialize)]
pub struct FileError {
    pub path: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
struct Totals {
    files: usize,
    errors: usize,
    exec_bytes: u64,
    total: u64,
    counts: Counts,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    schema: &'static str,
    files: &'a [FileReport],
    errors: &'a [FileError],
    totals: Totals,
}

/// Scan one file's bytes into a report. `list` keeps every hit.
pub fn report_bytes(path: &str, data: &[u8], list: bool) -> Result<FileReport, String> {
    let elf = Elf::parse(data).map_err(|e| e.to_string())?;
    let hits = scan_elf(&elf);
    Ok(build_report(path, &elf, &hits, list))
}

fn section_name(elf: &Elf<'_>, i: usize) -> String {
    elf.sections.get(i).map(|s| s.name.to_string()).unwrap_or_else(|| format!("#{i}"))
}

fn build_report(path: &str, elf: &Elf<'_>, hits: &[Hit], list: bool) -> FileReport {
    let linked = elf.elf_type.is_linked();
    let mut counts = Counts::default();
    let mut per_section: BTreeMap<usize, Counts> = BTreeMap::new();
    for h in hits {
        counts.add(h.entry.name(), 1);
        per_section.entry(h.section).or_default().add(h.entry.name(), 1);
    }
    counts.sort();
    let sections = elf
        .exec_sections()
        .map(|s| {
            let mut c = per_section.remove(&s.index).unwrap_or_default();
            c.sort();
            SectionReport {
                index: s.index,
                name: s.name.to_string(),
                address: linked.then(|| hex(s.addr)),
                size: s.data.len() as u64,
                total: c.total(),
                counts: c,
            }
        })
        .collect();
    let regions = elf
        .regions
        .iter()
        .map(|r| RegionReport {
            section: section_name(elf, r.section),
            start: r.start,
            end: r.end,
            bits: r.bits,
            reason: r.reason.clone(),
        })
        .collect();
    let mut rep = FileReport {
        path: path.to_string(),
        elf_type: elf.elf_type.name(),
        symbols: match elf.symbol_source {
            SymbolSource::Symtab => "symtab",
            SymbolSource::Dynsym => "dynsym",
            SymbolSource::None => "none",
        },
        exec_bytes: elf.exec_bytes(),
        total: hits.len() as u64,
        counts,
        sections,
        regions,
        sites: None,
        covered: None,
        uncovered: None,
        site_error: None,
        hits: None,
    };
    match sites::read(elf) {
        Ok(Some(table)) => {
            let cov = sites::coverage(hits, &table);
            rep.sites = Some(table.sites.len());
            rep.covered = Some(cov.covered);
            rep.uncovered = Some(
                cov.uncovered
                    .iter()
                    .map(|u| UncoveredReport {
                        section: section_name(elf, u.section),
                        offset: u.offset,
                        function: elf.function_at(u.section, u.offset),
                        kind: u.kind.name(),
                        reason: u.reason.token(),
                        detail: u.detail.clone(),
                    })
                    .collect(),
            );
        }
        Ok(None) => {}
        Err(e) => rep.site_error = Some(e.to_string()),
    }
    if list {
        rep.hits = Some(
            hits.iter()
                .map(|h| {
                    let sec = &elf.sections[h.section];
                    let mut bytes = String::with_capacity(h.len() * 3);
                    for (i, b) in h.bytes(elf).iter().enumerate() {
                        if i > 0 {
                            bytes.push(' ');
                        }
                        let _ = write!(bytes, "{b:02x}");
                    }
                    HitReport {
                        section: sec.name.to_string(),
                        offset: h.offset,
                        address: linked.then(|| hex(sec.addr.wrapping_add(h.offset))),
                        function: elf.function_at(h.section, h.offset),
                        bytes,
                        asm: h.att(),
                        kind: h.entry.name(),
                        class: h.entry.class().name(),
                        patched_by_default: h.entry.patched_by_default,
                        bits: h.bitness,
                    }
                })
                .collect(),
        );
    }
    rep
}

/// An input after expanding directories. A file named explicitly that is not ELF is an error;
/// in a directory walk, non-ELF files are skipped before they become inputs.
struct Input {
    path: PathBuf,
}

fn has_elf_magic(path: &Path) -> bool {
    let mut m = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut m)).is_ok() && is_elf(&m)
}

fn walk(dir: &Path, out: &mut Vec<Input>, errors: &mut Vec<FileError>) {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(e) => {
            errors.push(FileError { path: dir.display().to_string(), error: e.to_string() });
            return;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&p, out, errors);
        } else if (ft.is_file() || (ft.is_symlink() && p.is_file())) && has_elf_magic(&p) {
            out.push(Input { path: p });
        }
    }
}

/// A file's bytes: memory-mapped (only the pages that are read are loaded: a vmlinux scan
/// touches its code, not its 50 MB of data), or read into memory where mapping fails.
pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl FileBytes {
    pub fn open(path: &Path) -> std::io::Result<FileBytes> {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len > 0 {
            // SAFETY: the map is read-only and private to this process; previrt never writes
            // the files it scans. A file truncated by another process while mapped could
            // fault; scans of files being rewritten are not supported.
            if let Ok(m) = unsafe { memmap2::Mmap::map(&f) } {
                return Ok(FileBytes::Mapped(m));
            }
        }
        let mut v = Vec::with_capacity(len as usize);
        let mut f = f;
        f.read_to_end(&mut v)?;
        Ok(FileBytes::Read(v))
    }
    pub fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Read(v) => v,
        }
    }
}

fn scan_one(input: &Input, list: bool) -> Result<FileReport, FileError> {
    let path = input.path.display().to_string();
    let err = |error: String| FileError { path: path.clone(), error };
    let data = FileBytes::open(&input.path).map_err(|e| err(e.to_string()))?;
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| report_bytes(&path, data.bytes(), list)));
    match res {
        Ok(r) => r.map_err(err),
        Err(_) => Err(err("internal error while reading this file (please report it)".into())),
    }
}

/// Run `previrt scan`; returns the process exit status (0, or [`EXIT_BAD_INPUT`]).
pub fn run(args: &ScanArgs) -> i32 {
    let mut errors: Vec<FileError> = Vec::new();
    let mut inputs = Vec::new();
    for p in &args.paths {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => walk(p, &mut inputs, &mut errors),
            Ok(_) => inputs.push(Input { path: p.clone() }),
            Err(e) => errors.push(FileError { path: p.display().to_string(), error: e.to_string() }),
        }
    }

    let progress = if std::io::stderr().is_terminal() && inputs.len() > 1 {
        let pb = indicatif::ProgressBar::new(inputs.len() as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{spinner} scanning {pos}/{len} files {wide_bar} {eta}")
        {
            pb.set_style(style);
        }
        Some(pb)
    } else {
        None
    };
    let work = || {
        inputs
            .par_iter()
            .map(|i| {
                let r = scan_one(i, args.list);
                if let Some(pb) = &progress {
                    pb.inc(1);
                }
                r
            })
            .collect::<Vec<_>>()
    };
    let results = match args.jobs.and_then(|n| rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build().ok()) {
        Some(pool) => pool.install(work),
        None => work(),
    };
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    let mut reports = Vec::new();
    for r in results {
        match r {
            Ok(rep) => reports.push(rep),
            Err(e) => errors.push(e),
        }
    }

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io =
        if args.json { write_json(&mut out, &reports, &errors) } else { write_text(&mut out, &reports, args.list) };
    let _ = io.and_then(|_| out.flush());
    drop(out);
    for e in &errors {
        eprintln!("previrt scan: {}: {}", e.path, e.error);
    }
    if errors.is_empty() {
        0
    } else {
        EXIT_BAD_INPUT
    }
}

fn totals(reports: &[FileReport], errors: &[FileError]) -> Totals {
    let mut counts = Counts::default();
    for r in reports {
        for (k, n) in &r.counts.0 {
            counts.add(k, *n);
        }
    }
    counts.sort();
    Totals {
        files: reports.len(),
        errors: errors.len(),
        exec_bytes: reports.iter().map(|r| r.exec_bytes).sum(),
        total: counts.total(),
        counts,
    }
}

fn write_json(out: &mut impl Write, reports: &[FileReport], errors: &[FileError]) -> std::io::Result<()> {
    let j = JsonOut { schema: SCHEMA, files: reports, errors, totals: totals(reports, errors) };
    serde_json::to_writer_pretty(&mut *out, &j)?;
    writeln!(out)
}

fn mib(b: u64) -> String {
    if b < 1024 {
        format!("{b} B")
    } else if b < 1024 * 1024 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
    }
}

fn class_of(name: &str) -> &'static str {
    previrt_site_abi::Kind::from_name(name).map(|k| k.class().name()).unwrap_or("")
}

fn write_text(out: &mut impl Write, reports: &[FileReport], list: bool) -> std::io::Result<()> {
    if list {
        writeln!(out, "# file\tsection\toffset\taddress\tfunction\tbytes\tasm\tkind")?;
        for r in reports {
            for h in r.hits.iter().flatten() {
                let note = if h.bits != 64 { format!(" ({}-bit code)", h.bits) } else { String::new() };
                writeln!(
                    out,
                    "{}\t{}\t{:#x}\t{}\t{}\t{}\t{}\t{}{}",
                    r.path,
                    h.section,
                    h.offset,
                    h.address.as_deref().unwrap_or("-"),
                    h.function.as_deref().unwrap_or("-"),
                    h.bytes,
                    h.asm,
                    h.kind,
                    note
                )?;
            }
            for u in r.uncovered.iter().flatten() {
                writeln!(
                    out,
                    "uncovered\t{}\t{}\t{:#x}\t{}\t{}\t{}: {}",
                    r.path,
                    u.section,
                    u.offset,
                    u.function.as_deref().unwrap_or("-"),
                    u.kind,
                    u.reason,
                    u.detail
                )?;
            }
        }
        writeln!(out)?;
    }
    if reports.is_empty() {
        Ok(())
    } else if reports.len() == 1 {
        write_file_table(out, &reports[0])
    } else {
        write_many(out, reports)
    }
}

fn write_file_table(out: &mut impl Write, r: &FileReport) -> std::io::Result<()> {
    let nexec = r.sections.len();
    writeln!(
        out,
        "{}: ELF {}, {} of code in {} executable section{}, symbols: {}",
        r.path,
        r.elf_type,
        mib(r.exec_bytes),
        nexec,
        if nexec == 1 { "" } else { "s" },
        r.symbols
    )?;
    let cols: Vec<&SectionReport> = r.sections.iter().filter(|s| s.total > 0).collect();
    let widths: Vec<usize> = cols.iter().map(|s| s.name.len().max(6)).collect();
    let mut head = format!("{:<10} {:<18} {:>8}", "kind", "class", "total");
    for (s, w) in cols.iter().zip(&widths) {
        let _ = write!(head, "  {:>w$}", s.name, w = w);
    }
    writeln!(out, "{}", head.trim_end())?;
    for (k, n) in &r.counts.0 {
        let mut line = format!("{:<10} {:<18} {:>8}", k, class_of(k), n);
        for (s, w) in cols.iter().zip(&widths) {
            let _ = write!(line, "  {:>w$}", s.counts.get(k), w = w);
        }
        writeln!(out, "{line}")?;
    }
    let mut line = format!("{:<10} {:<18} {:>8}", "total", "", r.total);
    for (s, w) in cols.iter().zip(&widths) {
        let _ = write!(line, "  {:>w$}", s.total, w = w);
    }
    writeln!(out, "{line}")?;
    if r.counts.0.iter().any(|(k, _)| matches!(*k, "rdtsc" | "rdtscp")) {
        writeln!(out, "(rdtsc/rdtscp: time class, reported but not patched by default)")?;
    }
    for g in &r.regions {
        writeln!(
            out,
            "{}-bit code: {} {:#x}..{:#x} ({}): decoded as {}-bit, not rewritten",
            g.bits, g.section, g.start, g.end, g.reason, g.bits
        )?;
    }
    write_sites_line(out, r)
}

fn write_sites_line(out: &mut impl Write, r: &FileReport) -> std::io::Result<()> {
    if let Some(e) = &r.site_error {
        writeln!(out, "site table: unreadable: {e}")?;
    }
    if let (Some(sites), Some(covered), Some(unc)) = (r.sites, r.covered, &r.uncovered) {
        let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
        for u in unc {
            *by_reason.entry(u.reason).or_default() += 1;
        }
        let reasons: Vec<String> = by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(
            out,
            "site table: {sites} sites; {covered} of {} sensitive instructions covered, {} uncovered{}",
            r.total,
            unc.len(),
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
        )?;
    }
    Ok(())
}

fn write_many(out: &mut impl Write, reports: &[FileReport]) -> std::io::Result<()> {
    let w = reports.iter().map(|r| r.path.len()).max().unwrap_or(4).clamp(4, 60);
    writeln!(out, "{:<w$}  {:>10}  {:>7}  {:>9}  kinds", "file", "code", "total", "covered", w = w)?;
    for r in reports {
        let kinds: Vec<String> = r.counts.0.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let cov = match (r.covered, &r.uncovered) {
            (Some(c), Some(_)) => format!("{c}/{}", r.total),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<w$}  {:>10}  {:>7}  {:>9}  {}",
            r.path,
            mib(r.exec_bytes),
            r.total,
            cov,
            kinds.join(" "),
            w = w
        )?;
    }
    let t = totals(reports, &[]);
    writeln!(out)?;
    writeln!(out, "{} files, {} of code, {} sensitive instructions", t.files, mib(t.exec_bytes), t.total)?;
    writeln!(out, "{:<10} {:<18} {:>8}  {:>6}", "kind", "class", "total", "files")?;
    for (k, n) in &t.counts.0 {
        let files = reports.iter().filter(|r| r.counts.get(k) > 0).count();
        writeln!(out, "{:<10} {:<18} {:>8}  {:>6}", k, class_of(k), n, files)?;
    }
    for r in reports {
        for g in &r.regions {
            writeln!(
                out,
                "{}: {}-bit code: {} {:#x}..{:#x} ({})",
                r.path, g.bits, g.section, g.start, g.end, g.reason
            )?;
        }
        if r.site_error.is_some() || r.sites.is_some() {
            write!(out, "{}: ", r.path)?;
            write_sites_line(out, r)?;
        }
    }
    Ok(())
}

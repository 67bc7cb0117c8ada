//! The CROSS_COMPILE toolchain: one multi-call binary that acts as
//! `x86_64-previrt-linux-gnu-{gcc,as,ld,objdump,…}` so that
//! `make CROSS_COMPILE=$PREFIX/bin/x86_64-previrt-linux-gnu-` pre-virtualizes a build at
//! assembler level with no other change.
//!
//! - [`dispatch`]: called first thing by `main` — if argv[0] names a tool, run it. The
//!   pass-through tools `exec` the system tool at once (thousands of calls per build: no
//!   initialisation on that path).
//! - The compiler drivers run the system `gcc`/`g++` with `-B $PREFIX/libexec/previrt/`, so
//!   every assembler run gcc starts (C files, inline-asm blocks, `.S` files) reaches our `as`.
//! - [`asm`]: our `as` ([`text`] rewrites, [`objfill`] fills and verifies, [`report`] logs).
//! - [`install`]: `previrt toolchain install --prefix DIR`.

pub mod asm;
pub mod install;
pub mod mnemonics;
pub mod objfill;
pub mod report;
pub mod text;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target triple of the installed tool names.
pub const TRIPLE: &str = "x86_64-previrt-linux-gnu";
/// Where, under the prefix, the directory with our `as` lives (gcc's `-B`).
pub const AS_DIR: &str = "libexec/previrt";

/// What a tool name does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// A compiler driver: the system one with `-B <our as dir>`.
    Compiler(&'static str),
    /// Our assembler.
    As,
    /// The system tool, unchanged.
    System(&'static str),
}

/// Every tool name the toolchain answers to (`TRIPLE-NAME`, and `as` in the `-B` directory).
pub const TOOLS: &[(&str, Tool)] = &[
    ("gcc", Tool::Compiler("gcc")),
    ("cc", Tool::Compiler("gcc")),
    ("g++", Tool::Compiler("g++")),
    ("c++", Tool::Compiler("g++")),
    ("cpp", Tool::System("cpp")),
    ("as", Tool::As),
    ("ld", Tool::System("ld")),
    ("ld.bfd", Tool::System("ld.bfd")),
    ("ar", Tool::System("ar")),
    ("ranlib", Tool::System("ranlib")),
    ("nm", Tool::System("nm")),
    ("objcopy", Tool::System("objcopy")),
    ("objdump", Tool::System("objdump")),
    ("readelf", Tool::System("readelf")),
    ("strip", Tool::System("strip")),
    ("size", Tool::System("size")),
    ("strings", Tool::System("strings")),
    ("addr2line", Tool::System("addr2line")),
    ("elfedit", Tool::System("elfedit")),
    ("c++filt", Tool::System("c++filt")),
    ("gprof", Tool::System("gprof")),
    ("gcov", Tool::System("gcov")),
    ("gcc-ar", Tool::System("gcc-ar")),
    ("gcc-nm", Tool::System("gcc-nm")),
    ("gcc-ranlib", Tool::System("gcc-ranlib")),
];

/// The tool an invocation name selects: `NAME` or `ANYTHING-NAME`, longest name first
/// (`…-gcc-ar` is `gcc-ar`, not `ar`).
pub fn tool_for(argv0: &str) -> Option<Tool> {
    let base = Path::new(argv0).file_name()?.to_str()?;
    TOOLS
        .iter()
        .filter(|(name, _)| base == *name || base.strip_suffix(name).is_some_and(|p| p.ends_with('-')))
        .max_by_key(|(name, _)| name.len())
        .map(|&(_, tool)| tool)
}

/// If argv[0] names a tool, run it and return its exit status; `None` for `previrt` itself.
pub fn dispatch() -> Option<i32> {
    let mut args = std::env::args_os();
    let argv0 = args.next()?;
    let tool = tool_for(&argv0.to_string_lossy())?;
    let rest: Vec<OsString> = args.collect();
    Some(match tool {
        Tool::As => asm::main(rest),
        Tool::System(name) => exec(Command::new(name).args(rest)),
        Tool::Compiler(name) => match as_dir(&argv0) {
            Some(dir) => {
                let mut b = OsString::from("-B");
                b.push(dir.as_os_str());
                b.push("/");
                let (rest, annotations) = take_annotations(rest);
                let mut cmd = Command::new(name);
                if let Some(file) = annotations {
                    cmd.env(previrt_annotate::asm::ENV, file);
                }
                exec(cmd.arg(b).args(rest))
            }
            None => {
                eprintln!(
                    "previrt: no {AS_DIR}/as beside {}: run `previrt toolchain install --prefix DIR`",
                    argv0.to_string_lossy()
                );
                2
            }
        },
    })
}

/// `--annotations FILE` (or `=FILE`) is ours, not gcc's: it reaches our `as` through the
/// environment (`previrt annotate -o FILE` writes it).
fn take_annotations(args: Vec<OsString>) -> (Vec<OsString>, Option<OsString>) {
    let mut out = Vec::with_capacity(args.len());
    let mut file = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--annotations") => file = it.next(),
            Some(s) if s.starts_with("--annotations=") => file = Some(s["--annotations=".len()..].into()),
            _ => out.push(a),
        }
    }
    (out, file)
}

fn exec(cmd: &mut Command) -> i32 {
    let err = cmd.exec();
    eprintln!("previrt: cannot run {}: {err}", cmd.get_program().to_string_lossy());
    127
}

/// `PREFIX/libexec/previrt` for a tool invoked as `PREFIX/bin/NAME` (or found on `PATH`);
/// `PREVIRT_AS_DIR` overrides it.
fn as_dir(argv0: &OsString) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PREVIRT_AS_DIR") {
        return Some(PathBuf::from(d));
    }
    let invoked = Path::new(argv0);
    let path = if invoked.components().count() > 1 {
        invoked.to_path_buf()
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(invoked)).find(|p| p.exists())?
    };
    let dir = path.parent()?.parent()?.join(AS_DIR);
    dir.join("as").exists().then_some(dir)
}

/// `previrt toolchain …`
#[derive(Debug, clap::Subcommand)]
pub enum ToolchainCommand {
    /// Create DIR/bin/x86_64-previrt-linux-gnu-{gcc,as,ld,…} and DIR/libexec/previrt/as, then
    /// build with `make CROSS_COMPILE=DIR/bin/x86_64-previrt-linux-gnu-`.
    Install {
        #[arg(long, value_name = "DIR")]
        prefix: PathBuf,
        /// Link the tools to a private copy of this binary instead of the binary itself.
        #[arg(long)]
        copy: bool,
        /// Print what was installed as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report the sites of ELF files built with the toolchain (objects or a linked vmlinux):
    /// sites by kind, padding bytes, code size, coverage of the sensitive instructions.
    Report {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Run a `previrt toolchain` subcommand; returns the exit status.
pub fn run(cmd: ToolchainCommand) -> i32 {
    match cmd {
        ToolchainCommand::Install { prefix, copy, json } => match install::install(&prefix, copy) {
            Ok(done) if json => {
                println!("{}", serde_json::to_string_pretty(&done).expect("serializable"));
                0
            }
            Ok(done) => {
                println!("installed {} tools under {}", done.tools.len(), done.prefix.display());
                println!("build with: make CROSS_COMPILE={}", done.cross_compile);
                0
            }
            Err(e) => {
                eprintln!("previrt toolchain install: {e:#}");
                1
            }
        },
        ToolchainCommand::Report { files, json } => report_files(&files, json),
    }
}

fn report_files(files: &[PathBuf], json: bool) -> i32 {
    let mut reports = Vec::new();
    for f in files {
        match objfill::inspect(f) {
            Ok(r) => reports.push((f.display().to_string(), r)),
            Err(e) => {
                eprintln!("previrt toolchain report: {e:#}");
                return 2;
            }
        }
    }
    if json {
        let v: Vec<_> = reports.iter().map(|(f, r)| serde_json::json!({ "path": f, "report": r })).collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("serializable"));
        return 0;
    }
    for (f, r) in &reports {
        let sites: u32 = r.sites.values().sum();
        let pct = |n: u64, d: u64| if d == 0 { 0.0 } else { 100.0 * n as f64 / d as f64 };
        println!(
            "{f}: {sites} sites, padding {} bytes ({:.4}% of code), covered {}/{}",
            r.padding_bytes,
            pct(r.padding_bytes, r.code_bytes),
            r.covered,
            r.found
        );
        for (k, n) in &r.sites {
            println!("  {k:10} {n}");
        }
        for u in &r.uncovered {
            println!(
                "  uncovered {} at {}+{:#x} {}: {} ({})",
                u.kind,
                u.section,
                u.offset,
                u.function.as_deref().unwrap_or(""),
                u.reason,
                u.detail
            );
        }
    }
    0
}

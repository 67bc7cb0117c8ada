//! Our `as`: rewrite the input text into sites ([`crate::text`]), run the real assembler on
//! it through a pipe, then fill and verify the object ([`crate::objfill`]).
//!
//! It never breaks a build the plain toolchain would build: options it does not know pass
//! through, input it cannot rewrite is assembled unchanged, and when the real assembler
//! rejects the rewritten text the original is assembled instead (and the rejection logged).
//! The real assembler's messages and exit status always come through.

use crate::objfill::{self, ObjectReport};
use crate::report::{self, LogLine};
use crate::text::{Config, Rewriter};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The system assembler; `PREVIRT_REAL_AS` overrides it.
pub fn real_as() -> OsString {
    std::env::var_os("PREVIRT_REAL_AS").unwrap_or_else(|| "/usr/bin/as".into())
}

/// Options of GNU as that take their value as the next argument.
const VALUE_OPTIONS: &[&str] = &["-o", "-I", "--defsym", "-MD", "--debug-prefix-map"];
/// Options that make `as` do something other than assemble our kind of input.
const PASSTHROUGH_OPTIONS: &[(&str, &str)] = &[
    ("--version", "version query"),
    ("-v", "version query"),
    ("-version", "version query"),
    ("--help", "help"),
    ("--x32", "x32 ABI"),
];

/// The parsed command line.
#[derive(Debug, Default)]
pub struct AsArgs {
    /// Argument indices of input files (`-` is standard input); none means standard input.
    pub inputs: Vec<usize>,
    pub output: Option<PathBuf>,
    pub code64: bool,
    pub intel: bool,
    /// Why the whole invocation must pass through untouched.
    pub passthrough: Option<&'static str>,
}

pub fn parse_args(args: &[OsString]) -> AsArgs {
    let mut a = AsArgs { code64: true, ..Default::default() };
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if let Some(&(_, why)) = PASSTHROUGH_OPTIONS.iter().find(|(o, _)| *o == arg) {
            a.passthrough = Some(why);
        } else if arg.starts_with('@') {
            a.passthrough = Some("response file");
        } else if VALUE_OPTIONS.contains(&arg.as_ref()) {
            if arg == "-o" {
                a.output = args.get(i + 1).map(PathBuf::from);
            }
            i += 1;
        } else if let Some(o) = arg.strip_prefix("-o").filter(|o| !o.is_empty()) {
            a.output = Some(PathBuf::from(o));
        } else {
            match arg.as_ref() {
                "--32" => a.code64 = false,
                "--64" => a.code64 = true,
                "-msyntax=intel" => a.intel = true,
                "-msyntax=att" => a.intel = false,
                "-" => a.inputs.push(i),
                s if !s.starts_with('-') => a.inputs.push(i),
                _ => {}
            }
        }
        i += 1;
    }
    a
}

/// Entry point of the `as` personality. `args` excludes argv[0].
pub fn main(args: Vec<OsString>) -> i32 {
    let parsed = parse_args(&args);
    let logging = report::enabled();
    if let Some(why) = parsed.passthrough {
        if logging && why != "version query" && why != "help" {
            report::append(&LogLine { passthrough: Some(why), ..LogLine::new(&parsed, &args) });
        }
        return exec_real(&args);
    }
    let stdin_input = parsed.inputs.is_empty() || parsed.inputs.iter().any(|&i| args[i] == "-");
    let mut original = Vec::new();
    let mut rw = Rewriter::new(Config {
        min_site_len: previrt_rewriter::catalogue::CALL_REL32_LEN,
        code64: parsed.code64,
        intel: parsed.intel,
    });
    match previrt_annotate::asm::LineAnnotations::from_env() {
        None => {}
        Some(Ok(a)) => rw = rw.with_annotations(a),
        Some(Err(e)) => {
            eprintln!("previrt as: {e:#}");
            return 2;
        }
    }
    let inputs: Vec<Option<&OsStr>> = if parsed.inputs.is_empty() {
        vec![None]
    } else {
        parsed.inputs.iter().map(|&i| (args[i] != "-").then_some(args[i].as_os_str())).collect()
    };
    for input in &inputs {
        let bytes = match input {
            Some(path) => std::fs::read(path),
            None => {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b).map(|_| b)
            }
        };
        // Unreadable input: let the real assembler say so.
        let Ok(bytes) = bytes else { return exec_real(&args) };
        rw.feed(input.map(|p| p.to_string_lossy()).as_deref(), &bytes);
        if stdin_input {
            original.extend_from_slice(&bytes);
        }
    }
    let (text, stats) = rw.finish();
    let mut line = LogLine::new(&parsed, &args);
    let status = if stats.total() == 0 {
        if !stdin_input && !logging && !report::verbose() {
            return exec_real(&args);
        }
        run_real(&args, stdin_input.then_some(&original[..]), false).0
    } else {
        let piped = piped_args(&args, &parsed);
        let (status, err) = run_real(&piped, Some(&text), true);
        if status == 0 {
            std::io::stderr().write_all(&err).ok();
            0
        } else {
            let first = String::from_utf8_lossy(&err).lines().find(|l| l.contains("Error")).unwrap_or("").to_string();
            line.rewrite_rejected = Some(first);
            run_real(&args, stdin_input.then_some(&original[..]), false).0
        }
    };
    line.text = Some(&stats);
    if status != 0 {
        return status;
    }
    let object = parsed.output.clone().unwrap_or_else(|| PathBuf::from("a.out"));
    // Configuration probes assemble to /dev/null: nothing to fill or report.
    if !std::fs::metadata(&object).is_ok_and(|m| m.is_file()) {
        return 0;
    }
    // 16/32-bit objects (`--32`) hold no sites: the text side's list of what it left alone is
    // their report.
    let filled: Option<ObjectReport> =
        match parsed.code64.then(|| objfill::fill_and_verify(&object, &stats.narrow_code)) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                line.error = Some(e.to_string());
                None
            }
            None => None,
        };
    line.object_report = filled.as_ref();
    if report::verbose() {
        report::print_problems(&line);
    }
    if logging {
        report::append(&line);
    }
    0
}

/// `args` with the input files replaced by one `-` (standard input).
fn piped_args(args: &[OsString], parsed: &AsArgs) -> Vec<OsString> {
    let mut out: Vec<OsString> =
        args.iter().enumerate().filter(|(i, _)| !parsed.inputs.contains(i)).map(|(_, a)| a.clone()).collect();
    out.push("-".into());
    out
}

fn exec_real(args: &[OsString]) -> i32 {
    let err = Command::new(real_as()).args(args).exec();
    eprintln!("previrt as: cannot run {}: {err}", real_as().to_string_lossy());
    1
}

/// Run the real assembler, feeding `stdin` when given; returns its exit status and, when
/// `capture_stderr`, its standard error (otherwise it goes straight through).
fn run_real(args: &[OsString], stdin: Option<&[u8]>, capture_stderr: bool) -> (i32, Vec<u8>) {
    let mut cmd = Command::new(real_as());
    cmd.args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::inherit() });
    if capture_stderr {
        cmd.stderr(Stdio::piped());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("previrt as: cannot run {}: {e}", real_as().to_string_lossy());
            return (1, Vec::new());
        }
    };
    // Write on a thread so a chatty stderr cannot deadlock against a full stdin pipe.
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped");
        let data = data.to_vec();
        std::thread::spawn(move || pipe.write_all(&data).ok())
    });
    let mut err = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_end(&mut err).ok();
    }
    let status = child.wait().map(|s| s.code().unwrap_or(1)).unwrap_or(1);
    if let Some(w) = writer {
        w.join().ok();
    }
    (status, err)
}

//! The per-build log: one JSON line per assembled object, appended under a lock to
//! `PREVIRT_LOG`, and the `PREVIRT_VERBOSE=1` messages on standard error.

use crate::asm::AsArgs;
use crate::objfill::ObjectReport;
use crate::text::Stats;
use serde::Serialize;
use std::ffi::OsString;
use std::io::Write;

/// One log line.
#[derive(Serialize)]
pub struct LogLine<'a> {
    pub object: Option<String>,
    pub inputs: Vec<String>,
    pub code64: bool,
    /// Set when the whole invocation passed through (e.g. a response file).
    pub passthrough: Option<&'static str>,
    /// The real assembler's first error on the rewritten text; the original was assembled.
    pub rewrite_rejected: Option<String>,
    pub text: Option<&'a Stats>,
    pub object_report: Option<&'a ObjectReport>,
    pub error: Option<String>,
}

impl<'a> LogLine<'a> {
    pub fn new(parsed: &AsArgs, args: &[OsString]) -> LogLine<'a> {
        LogLine {
            object: parsed.output.as_ref().map(|p| p.display().to_string()),
            inputs: parsed.inputs.iter().map(|&i| args[i].to_string_lossy().into_owned()).collect(),
            code64: parsed.code64,
            passthrough: None,
            rewrite_rejected: None,
            text: None,
            object_report: None,
            error: None,
        }
    }
}

pub fn enabled() -> bool {
    std::env::var_os("PREVIRT_LOG").is_some_and(|v| !v.is_empty())
}

pub fn verbose() -> bool {
    std::env::var_os("PREVIRT_VERBOSE").is_some_and(|v| v == "1")
}

/// Append `line` to `PREVIRT_LOG` under an exclusive lock (many assemblers run at once).
/// Logging problems never fail the build.
pub fn append(line: &LogLine<'_>) {
    let Some(path) = std::env::var_os("PREVIRT_LOG") else { return };
    let Ok(mut json) = serde_json::to_vec(line) else { return };
    json.push(b'\n');
    let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) else { return };
    if f.lock().is_ok() {
        f.write_all(&json).ok();
        f.unlock().ok();
    }
}

/// What the text rewriting missed, on standard error.
pub fn print_problems(line: &LogLine<'_>) {
    let what = line.inputs.first().or(line.object.as_ref()).map(String::as_str).unwrap_or("<stdin>");
    if let Some(e) = &line.rewrite_rejected {
        eprintln!("previrt as: {what}: rewritten text rejected, assembled unchanged: {e}");
    }
    if let Some(e) = &line.error {
        eprintln!("previrt as: {what}: {e}");
    }
    if let Some(t) = line.text {
        for u in &t.unparsed {
            eprintln!("previrt as: {what}:{}: not parsed ({}), passed through", u.line, u.reason);
        }
        for n in &t.narrow_code {
            eprintln!("previrt as: {}: {} in 16/32-bit code left alone", n.at, n.kind);
        }
    }
    if let Some(r) = line.object_report {
        for u in &r.uncovered {
            let func = u.function.as_deref().map(|f| format!(" ({f})")).unwrap_or_default();
            eprintln!(
                "previrt as: {what}: uncovered {} at {}+{:#x}{func}: {}: {}",
                u.kind, u.section, u.offset, u.reason, u.detail
            );
        }
        for m in &r.mismatches {
            eprintln!("previrt as: {what}: site at {}+{:#x}: {}", m.section, m.offset, m.problem);
        }
    }
}

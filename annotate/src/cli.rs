//! `previrt annotate IMAGE [--profile FILE] [--reference FILE] [-o ANNOTATIONS] [--patch OUT]
//! [--json]`.

use crate::profile::Profile;
use crate::{analyse, emit, score, Annotations, Options, Reference, Score, SOURCES};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct AnnotateArgs {
    /// Linked kernel image with DWARF (vmlinux, the example kernel's kernel.elf).
    pub image: PathBuf,
    /// A `previrt run --profile` trace of this image: a third source, and (without
    /// --reference) the trace every source is scored against (recall, precision).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Score against this trace instead (another run or a longer window of the same image):
    /// the profile source is then measured on accesses it was not made from.
    #[arg(long, value_name = "FILE")]
    pub reference: Option<PathBuf>,
    /// Page-table entry type names for the DWARF source (default: pte_t pmd_t pud_t p4d_t pgd_t).
    #[arg(long = "pt-type", value_name = "NAME")]
    pub pt_types: Vec<String>,
    /// Write the annotations file (docs/annotations.md) here.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write a copy of IMAGE with a memory-access site (producer 3) for every annotation.
    #[arg(long, value_name = "OUT")]
    pub patch: Option<PathBuf>,
    /// Print the summary (counts per source and kind, scores) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run `previrt annotate`; returns the exit status (2 for bad input, 1 for output failures).
pub fn run(a: &AnnotateArgs) -> i32 {
    match run_inner(a) {
        Ok(()) => 0,
        Err((status, e)) => {
            eprintln!("previrt annotate: {e:#}");
            status
        }
    }
}

fn run_inner(a: &AnnotateArgs) -> Result<(), (i32, anyhow::Error)> {
    let bad = |e: anyhow::Error| (2, e);
    let data = std::fs::read(&a.image).with_context(|| format!("cannot read {}", a.image.display())).map_err(bad)?;
    let profile = a.profile.as_deref().map(Profile::read).transpose().map_err(bad)?;
    let reference = a.reference.as_deref().map(Profile::read).transpose().map_err(bad)?;
    let mut opts = Options::default();
    if !a.pt_types.is_empty() {
        opts.pt_types = a.pt_types.clone();
    }
    let ann = analyse(&data, &a.image.display().to_string(), &opts, profile.as_ref()).map_err(bad)?;
    let write_fail = |e: anyhow::Error| (1, e);
    if let Some(out) = &a.output {
        let json = serde_json::to_vec_pretty(&ann).expect("serializable");
        write(out, &json).map_err(write_fail)?;
    }
    let patched = match &a.patch {
        Some(out) => {
            let (bytes, n) = emit::patch(&data, &ann).map_err(bad)?;
            write(out, &bytes).map_err(write_fail)?;
            Some(n)
        }
        None => None,
    };
    let sc = match reference.as_ref().or(profile.as_ref()) {
        Some(r) => Some(score(&ann, &Reference::of(&data, &ann.image, r).map_err(bad)?)),
        None => None,
    };
    if a.json {
        let v = serde_json::json!({
            "image": ann.image, "debug_info": ann.debug_info, "found": ann.found,
            "by_kind": by_kind(&ann), "profile_skipped": ann.profile_skipped, "score": sc,
            "patched_sites": patched.as_ref().map(|p| p.sites),
            "trampoline_sites": patched.as_ref().map(|p| p.trampolines),
            "trap_sites": patched.as_ref().map(|p| p.traps.iter()
                .map(|(addr, r)| serde_json::json!({"address": addr, "reason": r.text()})).collect::<Vec<_>>()),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializable"));
    } else {
        print_summary(&ann, sc.as_ref(), patched);
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    previrt_atomic_write::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn by_kind(ann: &Annotations) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for a in &ann.accesses {
        *m.entry(a.kind).or_insert(0) += 1;
    }
    m
}

fn print_summary(ann: &Annotations, sc: Option<&Score>, patched: Option<emit::Patched>) {
    println!("{}: {} memory accesses annotated", ann.image, ann.accesses.len());
    if !ann.debug_info {
        println!("  no DWARF line table: rules see symbols only, the DWARF source finds nothing");
    }
    for s in SOURCES {
        println!("  {:8} {}", s.name(), ann.found.get(&s).copied().unwrap_or(0));
    }
    for (k, n) in by_kind(ann) {
        println!("  {k:10} {n}");
    }
    if !ann.profile_skipped.is_empty() {
        println!("  {} traced instructions cannot be sites (see --json)", ann.profile_skipped.len());
    }
    if let Some(sc) = sc {
        println!("against the reference trace ({} traced instructions):", sc.traced);
        println!(
            "  {:12} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>11} {:>11}",
            "source", "found", "true", "false", "unexec", "recall", "precision", "executions", "wasted"
        );
        for s in &sc.sources {
            println!(
                "  {:12} {:>6} {:>6} {:>6} {:>8} {:>7.1}% {:>8.1}% {:>11} {:>11}",
                s.source,
                s.found,
                s.true_sites,
                s.false_sites.len(),
                s.not_executed,
                100.0 * s.recall,
                100.0 * s.precision,
                s.site_executions,
                s.wasted_executions
            );
        }
    }
    if let Some(p) = patched {
        println!(
            "patched: {} memory-access sites (producer 3): {} in trampolines, {} TRAP",
            p.sites,
            p.trampolines,
            p.traps.len()
        );
        for (addr, r) in &p.traps {
            println!("  TRAP {addr:#x}: {}", r.text());
        }
    }
}

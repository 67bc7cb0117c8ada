//! `previrt demo`: the issue-5 proof in one command. Builds the example kernel plainly and
//! pre-virtualized (toolchain into a work directory, `make CROSS_COMPILE=…`, `previrt link`),
//! runs both under the in-tree hypervisor (`previrt run --stats-json`, same VMM, same command
//! line; the pre-virtualized kernel with `previrt.backend=auto`, i.e. the `hv` backend), and
//! prints exits by reason and category, time per workload and the verdict lines side by side.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// `previrt demo` arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Work directory (toolchain, builds, run reports); kept afterwards. Default: a new
    /// directory under the system temp directory.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// The example kernel's source (default: examples/kernel of this checkout).
    #[arg(long)]
    pub kernel_src: Option<PathBuf>,
    /// Kernel command line for both runs (e.g. `workloads=timer,console`). 100 Hz by default:
    /// on KVM-PVM ring-0 code is instruction-emulated, and a tick whose EOI and iretq run
    /// through the runtime costs about a millisecond, so 1 kHz would starve the workloads.
    #[arg(long, default_value = "hz=100")]
    pub append: String,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit categories: a port range or hypercall names. Doorbell writes are ioeventfds and never
/// reach the VMM, so they appear in no category.
const CATEGORIES: &[(&str, &[(u16, u16)], &[&str])] = &[
    ("console", &[(0x3f8, 0x3ff)], &["CONSOLE_WRITE", "CONSOLE_FLUSH"]),
    (
        "timer/pic",
        &[(0x20, 0x21), (0xa0, 0xa1), (0x40, 0x43), (0x61, 0x61)],
        &["TIMER_SET", "SET_EVENT_VECTOR", "HALT"],
    ),
    ("interrupt-flag", &[], &[]),
];

/// One run's result.
struct Run {
    status: Option<i32>,
    wall_ms: f64,
    stdout: String,
    stats: Value,
}

/// Lines that must be identical: verdicts, checksums, console text.
fn verdicts(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with("WORKLOAD ") || l.starts_with("RESULT ") || l.starts_with("CONSOLE "))
        .collect()
}

/// `TIMING <name> seq=<n> tsc=<cycles>` → (name, cycles).
fn timings(out: &str) -> Vec<(String, u64)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("TIMING ")?.split(' ');
            let name = w.next()?.to_string();
            let tsc = w.find_map(|x| x.strip_prefix("tsc="))?.parse().ok()?;
            Some((name, tsc))
        })
        .collect()
}

fn count(v: &Value) -> u64 {
    v["count"].as_u64().unwrap_or(0)
}

/// Exits of one category: ports in its ranges plus its hypercalls (stats names are
/// "0xPORT in|out" and the hypercall names of the VMM).
fn category(stats: &Value, ranges: &[(u16, u16)], calls: &[&str]) -> u64 {
    let ports: u64 = stats["ports"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            let port = k.split(' ').next().and_then(|p| u16::from_str_radix(p.trim_start_matches("0x"), 16).ok());
            port.is_some_and(|p| ranges.iter().any(|(a, b)| (*a..=*b).contains(&p)))
        })
        .map(|(_, v)| count(v))
        .sum();
    let hc: u64 = stats["hypercalls"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| calls.iter().any(|c| k.eq_ignore_ascii_case(c)))
        .map(|(_, v)| count(v))
        .sum();
    ports + hc
}

fn step(what: &str, cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("{what}: cannot start (run scripts/install-deps.sh)"))?;
    if !o.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn run_kernel(exe: &Path, kernel: &Path, append: &str, stats: &Path) -> Result<Run> {
    let t = Instant::now();
    let o = Command::new(exe)
        .args(["run", "--boot", "pvh", "--append", append, "--stats-json"])
        .arg(stats)
        .arg(kernel)
        .output()
        .context("cannot start previrt run")?;
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    let stats =
        serde_json::from_slice(&std::fs::read(stats).with_context(|| {
            format!("previrt run wrote no statistics: {}", String::from_utf8_lossy(&o.stderr).trim())
        })?)?;
    Ok(Run { status: o.status.code(), wall_ms, stdout: String::from_utf8_lossy(&o.stdout).into_owned(), stats })
}

fn ratio(a: u64, b: u64) -> Value {
    if b == 0 {
        Value::Null
    } else {
        json!((a as f64 / b as f64 * 10.0).round() / 10.0)
    }
}

/// The comparison as JSON (the table is printed from it).
fn compare(plain: &Run, pv: &Run) -> Value {
    let total = |r: &Run| r.stats["exits"].as_u64().unwrap_or(0);
    let mut reasons = serde_json::Map::new();
    for r in [plain, pv] {
        for k in r.stats["reasons"].as_object().into_iter().flatten().map(|(k, _)| k) {
            let c = |r: &Run| count(&r.stats["reasons"][k]);
            reasons
                .insert(k.clone(), json!({"unmodified": c(plain), "previrt": c(pv), "ratio": ratio(c(plain), c(pv))}));
        }
    }
    let categories: serde_json::Map<String, Value> = CATEGORIES
        .iter()
        .map(|(name, ranges, calls)| {
            let (a, b) = (category(&plain.stats, ranges, calls), category(&pv.stats, ranges, calls));
            (name.to_string(), json!({"unmodified": a, "previrt": b, "ratio": ratio(a, b)}))
        })
        .collect();
    let (tp, tv) = (timings(&plain.stdout), timings(&pv.stdout));
    let workloads: Vec<Value> = tp
        .iter()
        .map(|(name, a)| {
            let b = tv.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
            json!({"workload": name, "unmodified_tsc": a, "previrt_tsc": b, "ratio": b.map(|b| ratio(b, *a))})
        })
        .collect();
    let (vp, vv) = (verdicts(&plain.stdout), verdicts(&pv.stdout));
    json!({
        "exits": {"unmodified": total(plain), "previrt": total(pv), "ratio": ratio(total(plain), total(pv))},
        "reasons": reasons,
        "categories": categories,
        "wall_ms": {"unmodified": plain.wall_ms.round(), "previrt": pv.wall_ms.round()},
        "workloads": workloads,
        "identical_output": vp == vv,
        "status": {"unmodified": plain.status, "previrt": pv.status},
        "results": {
            "unmodified": vp.iter().filter(|l| !l.starts_with("CONSOLE ")).collect::<Vec<_>>(),
            "previrt": vv.iter().filter(|l| !l.starts_with("CONSOLE ")).collect::<Vec<_>>(),
        },
        "boot": pv.stdout.lines().filter(|l| l.starts_with("previrt")).collect::<Vec<_>>(),
    })
}

fn table(c: &Value) -> String {
    let num = |v: &Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    let rat = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x}x"));
    let mut s = format!("{:<28} {:>12} {:>12} {:>10}\n", "exits", "unmodified", "previrt hv", "fewer");
    let row = |s: &mut String, name: &str, v: &Value| {
        s.push_str(&format!(
            "{name:<28} {:>12} {:>12} {:>10}\n",
            num(&v["unmodified"]),
            num(&v["previrt"]),
            rat(&v["ratio"])
        ))
    };
    row(&mut s, "total", &c["exits"]);
    for (k, v) in c["categories"].as_object().into_iter().flatten() {
        row(&mut s, &format!("  {k}"), v);
    }
    for (k, v) in c["reasons"].as_object().into_iter().flatten() {
        row(&mut s, &format!("  reason {k}"), v);
    }
    s.push_str(&format!("\n{:<28} {:>12} {:>12} {:>10}\n", "time", "unmodified", "previrt hv", "slower"));
    s.push_str(&format!(
        "{:<28} {:>12} {:>12}\n",
        "wall ms",
        num(&c["wall_ms"]["unmodified"]),
        num(&c["wall_ms"]["previrt"])
    ));
    for w in c["workloads"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:<28} {:>12} {:>12} {:>10}\n",
            format!("  {} tsc", w["workload"].as_str().unwrap_or("?")),
            num(&w["unmodified_tsc"]),
            num(&w["previrt_tsc"]),
            rat(&w["ratio"])
        ));
    }
    s.push_str(&format!("\nverdicts and checksums identical: {}\n", c["identical_output"]));
    for l in c["results"]["previrt"].as_array().into_iter().flatten() {
        s.push_str(&format!("  {}\n", l.as_str().unwrap_or("")));
    }
    s
}

fn demo(a: &DemoArgs) -> Result<Value> {
    let exe = std::env::current_exe().context("cannot find the previrt executable")?;
    let work =
        a.work.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("previrt-demo-{}", std::process::id())));
    let src = a.kernel_src.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kernel"));
    if !src.join("Makefile").is_file() {
        bail!("{}: no example kernel Makefile (use --kernel-src)", src.display());
    }
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let tc = work.join("toolchain");
    eprintln!("previrt demo: installing the toolchain into {}", tc.display());
    step("previrt toolchain install", Command::new(&exe).args(["toolchain", "install", "--prefix"]).arg(&tc))?;
    let make = |dir: &str, cross: Option<String>| {
        eprintln!("previrt demo: make ({dir})");
        let mut c = Command::new("make");
        c.arg("-s").arg("-C").arg(&src).arg(format!("O={}", work.join(dir).display()));
        if let Some(p) = cross {
            c.arg(format!("CROSS_COMPILE={p}"));
        }
        step("make", &mut c)
    };
    make("plain", None)?;
    make("previrt", Some(format!("{}/bin/x86_64-previrt-linux-gnu-", tc.display())))?;
    let linked = work.join("previrt/linked.elf");
    step(
        "previrt link",
        Command::new(&exe).arg("link").arg(work.join("previrt/kernel-pvh.elf")).arg("-o").arg(&linked),
    )?;
    eprintln!("previrt demo: running the unmodified kernel");
    let plain = run_kernel(&exe, &work.join("plain/kernel-pvh.elf"), a.append.trim(), &work.join("plain.json"))?;
    eprintln!("previrt demo: running the pre-virtualized kernel (hv backend)");
    let append = format!("previrt.backend=auto {}", a.append).trim().to_string();
    let pv = run_kernel(&exe, &linked, &append, &work.join("previrt.json"))?;
    Ok(compare(&plain, &pv))
}

/// Run `previrt demo`; the process exit status: 0 when both runs give identical verdicts and
/// checksums, 1 when they differ, 2 when something could not be built or run.
pub fn run(a: &DemoArgs) -> i32 {
    match demo(a) {
        Ok(c) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
            } else {
                print!("{}", table(&c));
            }
            if c["identical_output"] == true {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("previrt demo: {e:#}");
            2
        }
    }
}

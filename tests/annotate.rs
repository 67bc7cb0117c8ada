//! `previrt annotate` on the example kernel: the static sources (rules, DWARF) against the
//! kernel's own accessor definitions and against the in-tree hypervisor's trace
//! (`previrt run --profile`), and both emission paths — trap sites by address in the linked
//! image, and sites by `file:line` through the toolchain's `as` — with the kernels still
//! behaving exactly like the plain build.

mod common;

use common::{deterministic_lines, example_kernel, kernel_src, run_qemu, workload_lines};
use previrt_rewriter::elf::Elf;
use previrt_site_abi::{flags, Kind, Producer};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn previrt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_previrt")).args(args).output().expect("running previrt")
}

fn json_of(o: &Output) -> Value {
    assert!(o.status.success(), "previrt failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("--json output")
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("annotate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The annotations file for `image` (rules and DWARF only).
fn annotations(image: &Path, out: &Path) -> Value {
    annotations_with(image, &[], out)
}

/// The annotations file for `image` with more `previrt annotate` arguments (`--profile P`).
fn annotations_with(image: &Path, more: &[&str], out: &Path) -> Value {
    let o = previrt(&[&["annotate", s(image), "-o", s(out)], more].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

/// Lines of the kernel's accessor definitions that do the access: `movl` in readl/writel
/// (include/io.h), READ_ONCE/WRITE_ONCE in get_pte/set_pte (include/mm.h).
fn accessor_lines() -> BTreeSet<(String, u64, &'static str)> {
    let mut want = BTreeSet::new();
    for (file, needle, class) in
        [("io.h", "asm volatile(\"movl", "mmio"), ("mm.h", "READ_ONCE(ptep", "pt"), ("mm.h", "WRITE_ONCE(ptep", "pt")]
    {
        let path = kernel_src().join("include").join(file);
        for (i, l) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            if l.contains(needle) {
                want.insert((path.display().to_string(), i as u64 + 1, class));
            }
        }
    }
    want
}

#[test]
fn static_sources_find_exactly_the_accessor_lines() {
    let k = example_kernel();
    let d = scratch("static");
    let ann = annotations(&k.pvh_elf(), &d.join("ann.json"));
    assert_eq!(ann["format"], "previrt-annotations/1");
    assert_eq!(ann["debug_info"], true, "the example kernel is built with -g");
    let accesses = ann["accesses"].as_array().unwrap();
    let got: BTreeSet<(String, u64, &str)> = accesses
        .iter()
        .map(|a| {
            let class = if a["kind"].as_str().unwrap().starts_with("mmio") { "mmio" } else { "pt" };
            (a["file"].as_str().unwrap().to_string(), a["line"].as_u64().unwrap(), class)
        })
        .collect();
    assert_eq!(got, accessor_lines(), "annotated source lines");
    for a in accesses {
        let srcs: Vec<&str> = a["sources"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(srcs.contains(&"rules"), "every access is inside an accessor: {a}");
        let insn = a["insn"].as_str().unwrap();
        let write = a["kind"].as_str().unwrap().ends_with("write");
        // AT&T: a store names memory last.
        assert_eq!(write, insn.trim_end().ends_with(')'), "direction of {insn}");
        assert!([4, 8].contains(&a["width"].as_u64().unwrap()), "{a}");
    }
    let dwarf = accesses.iter().filter(|a| a["sources"].as_array().unwrap().iter().any(|v| v == "dwarf")).count();
    assert!(dwarf * 10 >= accesses.len() * 8, "DWARF typed pointers explain {dwarf} of {} accesses", accesses.len());
}

/// `previrt run --profile` of `image` on the `mmio` workload: the profile file and its JSON.
fn mmio_profile(image: &Path, dir: &Path) -> (PathBuf, Value) {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm missing: run scripts/install-deps.sh on a KVM host");
    let prof = dir.join("profile.json");
    let run = previrt(&["run", s(image), "--append", "workloads=mmio", "--profile", s(&prof)]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(out.contains("RESULT PASS"), "{out}{}", String::from_utf8_lossy(&run.stderr));
    let p: Value = serde_json::from_slice(&std::fs::read(&prof).unwrap()).unwrap();
    assert_eq!(p["format"], "previrt-profile/1");
    (prof, p)
}

/// Accesses of one kind the profile counted in 64-bit code.
fn traced_count(p: &Value, kind: &str) -> u64 {
    let rows = p["accesses"].as_array().unwrap().iter();
    rows.filter(|t| t["kind"] == kind && t["code64"] == true).map(|t| t["count"].as_u64().unwrap()).sum()
}

#[test]
fn profile_recall_is_complete_and_false_sites_only_touch_unlinked_tables() {
    let k = example_kernel();
    let (prof, p) = mmio_profile(&k.pvh_elf(), &scratch("profile"));
    let traced = p["accesses"].as_array().unwrap();
    for t in traced.iter().filter(|t| t["kind"].as_str().unwrap().starts_with("mmio")) {
        assert_eq!(t["gpa"].as_u64().unwrap() & !0xfff, 0xfee0_0000, "MMIO is the LAPIC page: {t}");
    }
    let kinds: BTreeSet<&str> = traced.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert!(kinds.is_superset(&["mmio_read", "mmio_write", "pt_read", "pt_write"].into()), "{kinds:?}");

    let r = json_of(&previrt(&["annotate", s(&k.pvh_elf()), "--profile", s(&prof), "--json"]));
    let score = &r["score"];
    assert!(score["traced"].as_u64().unwrap() >= 8, "{score}");
    for src in score["sources"].as_array().unwrap() {
        assert_eq!(src["missed"], serde_json::json!([]), "{src}");
        assert_eq!(src["recall"], 1.0, "{src}");
        // The trace classifies an access when it happens: `set_pte`s into a table not yet
        // linked (pt_alloc zeroing a fresh table, inlined into walk and paging_init;
        // paging_init filling kernel_pml4 before loading it in CR3) are plain stores, so
        // those annotations are the only false sites; every LAPIC and live-table site is true.
        for f in src["false_sites"].as_array().unwrap() {
            assert!(["walk", "paging_init"].contains(&f["function"].as_str().unwrap()), "{f}");
        }
    }
    // What the trace saw but no site can hold is only the 32-bit boot trampoline.
    for sk in r["profile_skipped"].as_array().unwrap() {
        assert!(sk["reason"].as_str().unwrap().starts_with("16/32-bit"), "{sk}");
    }
    // Executions: every site execution is traced or wasted, and the hottest list names only
    // sites that ran for nothing at least once.
    for src in score["sources"].as_array().unwrap() {
        let (all, wasted) = (src["site_executions"].as_u64().unwrap(), src["wasted_executions"].as_u64().unwrap());
        assert!(all > 0 && wasted <= all, "{src}");
        for h in src["hottest"].as_array().unwrap() {
            assert!(h["executed"].as_u64().unwrap() > h["traced"].as_u64().unwrap(), "{h}");
        }
    }

    // Held out: a profile holding only the rows of the first half of the traced
    // instructions, scored against the whole trace (--reference). The profile source then
    // finds exactly the instructions it kept; the union with rules and DWARF finds them all.
    let full: Value = serde_json::from_slice(&std::fs::read(&prof).unwrap()).unwrap();
    let rows = full["accesses"].as_array().unwrap();
    let rips: BTreeSet<u64> = rows.iter().filter(|t| t["code64"] == true).map(|t| t["rip"].as_u64().unwrap()).collect();
    let kept_sites: BTreeSet<u64> = rips.iter().take(rips.len() / 2).copied().collect();
    let mut half = full.clone();
    half["accesses"] =
        rows.iter().filter(|t| kept_sites.contains(&t["rip"].as_u64().unwrap())).cloned().collect::<Vec<_>>().into();
    let half_path = prof.with_file_name("half.json");
    std::fs::write(&half_path, serde_json::to_vec(&half).unwrap()).unwrap();
    let h = json_of(&previrt(&[
        "annotate",
        s(&k.pvh_elf()),
        "--profile",
        s(&half_path),
        "--reference",
        s(&prof),
        "--json",
    ]));
    let group =
        |name: &str| h["score"]["sources"].as_array().unwrap().iter().find(|g| g["source"] == name).unwrap().clone();
    let traced = h["score"]["traced"].as_u64().unwrap();
    assert_eq!(traced, score["traced"].as_u64().unwrap(), "the reference decides what was traced");
    let p = group("profile");
    assert_eq!(p["true_sites"].as_u64().unwrap() as usize, kept_sites.len(), "{p}");
    assert!(kept_sites.len() < traced as usize, "the held-out profile leaves instructions out");
    assert_eq!(p["recall"].as_f64().unwrap(), kept_sites.len() as f64 / traced as f64, "{p}");
    assert_eq!(group("all")["recall"], 1.0, "{}", group("all"));

    // The write-protect tracer (--profile-writes: page tables in read-only memslots, no
    // single-stepping) sees the same page-table stores as the stepped trace, resolved from the
    // RIP after each store to the store itself.
    let wprof = prof.with_file_name("writes.json");
    let run =
        previrt(&["run", s(&k.pvh_elf()), "--append", "workloads=mmio", "--profile", s(&wprof), "--profile-writes"]);
    assert!(String::from_utf8_lossy(&run.stdout).contains("RESULT PASS"), "{}", String::from_utf8_lossy(&run.stderr));
    let w: Value = serde_json::from_slice(&std::fs::read(&wprof).unwrap()).unwrap();
    assert_eq!(w["mode"], "writes");
    assert!(w["accesses"].as_array().unwrap().iter().all(|t| t["kind"] == "pt_write" && t["after"] == true), "{w}");
    let wann = annotations_with(&k.pvh_elf(), &["--profile", s(&wprof)], &prof.with_file_name("writes-ann.json"));
    let by_writes: BTreeSet<u64> = wann["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["sources"].as_array().unwrap().iter().any(|v| v == "profile"))
        .map(|a| a["address"].as_u64().unwrap())
        .collect();
    let stepped: BTreeSet<u64> = rows
        .iter()
        .filter(|t| t["kind"] == "pt_write" && t["code64"] == true)
        .map(|t| t["rip"].as_u64().unwrap())
        .collect();
    assert!(!stepped.is_empty());
    assert_eq!(by_writes, stepped, "page-table stores: write-protect tracer vs single-stepping");
    assert_eq!(wann["profile_skipped"], serde_json::json!([]), "{}", wann["profile_skipped"]);
}

#[test]
fn post_link_sites_by_address_and_the_image_still_runs() {
    let k = example_kernel();
    let d = scratch("postlink");
    let ann = annotations(&k.pvh_elf(), &d.join("ann.json"));
    let out = d.join("kernel-ann.elf");
    let o = previrt(&["annotate", s(&k.pvh_elf()), "--patch", s(&out), "--json"]);
    let r = json_of(&o);
    let accesses = ann["accesses"].as_array().unwrap();
    assert_eq!(r["patched_sites"].as_u64().unwrap() as usize, accesses.len());
    // The example kernel's text has no int3 padding (gcc pads with NOPs), so the planner finds
    // no room for trampolines and every site stays in place as a TRAP site, saying why.
    assert_eq!(r["trampoline_sites"], 0);
    for t in r["trap_sites"].as_array().unwrap() {
        assert!(t["reason"].as_str().unwrap().starts_with("no int3 padding"), "{t}");
    }

    let data = std::fs::read(&out).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let table = previrt_rewriter::sites::read(&elf).unwrap().expect("a site table");
    assert_eq!(table.sites.len(), accesses.len());
    for (site, a) in table.sites.iter().zip(accesses) {
        assert_eq!(site.producer, Producer::Annotate);
        let (sec, off) = site.site.section_offset().expect("site in a section");
        assert_eq!(elf.sections[sec].addr + off, a["address"].as_u64().unwrap());
        let rec = site.record;
        assert_eq!(Kind::from_u16(rec.kind).unwrap().name(), a["kind"].as_str().unwrap());
        assert!(rec.has(flags::TRAP) && rec.has(flags::MEM), "{rec:?}");
        assert_eq!(rec.has(flags::WRITE), a["kind"].as_str().unwrap().ends_with("write"));
        assert_eq!((rec.site_len, rec.width as u64), (rec.insn_len, a["width"].as_u64().unwrap()));
    }
    // Trap-based sites: every executable byte stays as it was.
    let original = std::fs::read(k.pvh_elf()).unwrap();
    let orig = Elf::parse(&original).unwrap();
    for sec in orig.exec_sections() {
        let now = elf.section_by_name(&sec.name).unwrap();
        assert_eq!((now.addr, now.data), (sec.addr, sec.data), "{}", sec.name);
    }
    let (plain, patched) =
        (run_qemu(&k.pvh_elf(), "workloads=pagetable,mmio"), run_qemu(&out, "workloads=pagetable,mmio"));
    assert_eq!(patched.status, 0, "{}", patched.stdout);
    assert_eq!(deterministic_lines(&patched.stdout), deterministic_lines(&plain.stdout));
}

/// Relocatable objects: each object of the example kernel annotated on its own (sections at 0,
/// its DWARF relocated in memory) yields exactly the linked image's accesses, counted per
/// source line and kind; the objects patched with memory sites (`--patch`) link into a kernel
/// with one site per annotation that behaves like the plain one.
#[test]
fn objects_are_annotated_and_patched_like_the_linked_image() {
    let d = scratch("objects");
    let k = common::build_example_kernel(&d.join("k"), None);
    let count = |ann: &Value, into: &mut std::collections::BTreeMap<(String, u64, String), usize>| {
        for a in ann["accesses"].as_array().unwrap() {
            let key =
                (a["file"].as_str().unwrap().into(), a["line"].as_u64().unwrap(), a["kind"].as_str().unwrap().into());
            *into.entry(key).or_default() += 1;
        }
    };
    let (mut linked, mut objects) = Default::default();
    let linked_ann = annotations(&k.pvh_elf(), &d.join("linked.json"));
    count(&linked_ann, &mut linked);
    let plain = run_qemu(&k.pvh_elf(), "workloads=pagetable,mmio");
    let mut patched = 0;
    for e in std::fs::read_dir(&k.dir).unwrap() {
        let obj = e.unwrap().path();
        if obj.extension().is_none_or(|x| x != "o") {
            continue;
        }
        let ann = annotations(&obj, &d.join("obj.json"));
        count(&ann, &mut objects);
        if ann["accesses"].as_array().unwrap().is_empty() {
            continue;
        }
        let out = d.join("patched.o");
        let r = json_of(&previrt(&["annotate", s(&obj), "--patch", s(&out), "--json"]));
        assert_eq!(r["patched_sites"].as_u64().unwrap() as usize, ann["accesses"].as_array().unwrap().len());
        patched += r["patched_sites"].as_u64().unwrap();
        std::fs::rename(&out, &obj).unwrap();
    }
    assert_eq!(objects, linked, "accesses per (file, line, kind): objects vs linked image");
    assert_eq!(patched as usize, linked_ann["accesses"].as_array().unwrap().len());

    // Relink from the patched objects (newer than their sources, so make only links).
    std::fs::remove_file(k.pvh_elf()).unwrap();
    let relinked = common::build_example_kernel(&k.dir, None);
    let rep = json_of(&previrt(&["toolchain", "report", s(&relinked.pvh_elf()), "--json"]));
    let sites: u64 = rep[0]["report"]["sites"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(sites, patched, "{}", rep[0]["report"]["sites"]);
    let run = run_qemu(&relinked.pvh_elf(), "workloads=pagetable,mmio");
    assert_eq!(run.status, 0, "{}", run.stdout);
    assert_eq!(deterministic_lines(&run.stdout), deterministic_lines(&plain.stdout));
}

/// The example kernel built by the previrt toolchain with the rules+DWARF annotations of the
/// plain build (`gcc --annotations`): the annotations and the build directory.
fn annotated_kernel(d: &Path) -> (Value, PathBuf) {
    let ann_path = d.join("ann.json");
    let ann = annotations(&example_kernel().pvh_elf(), &ann_path);
    let prefix = d.join("tc");
    assert!(previrt(&["toolchain", "install", "--prefix", s(&prefix)]).status.success());
    let cross = format!("{}/bin/x86_64-previrt-linux-gnu-", prefix.display());
    let out = d.join("k");
    let st = Command::new("make")
        .args(["-s", "-C", s(&kernel_src())])
        .arg(format!("O={}", out.display()))
        .arg(format!("CROSS_COMPILE={cross}"))
        .arg(format!("CC={cross}gcc --annotations {}", ann_path.display()))
        .status()
        .expect("make (run scripts/install-deps.sh)");
    assert!(st.success());
    (ann, out)
}

/// Preprocessed assembly (`.S`) has no `.loc`: the toolchain's `as` places its statements by
/// cpp's line markers, so annotated lines of a `.S` file — a macro from a header included —
/// become sites and the lines around them do not.
#[test]
fn annotated_lines_of_preprocessed_assembly_become_sites() {
    let d = scratch("dot-s");
    let prefix = d.join("tc");
    assert!(previrt(&["toolchain", "install", "--prefix", s(&prefix)]).status.success());
    std::fs::write(
        d.join("pt.h"),
        "/* a header whose lines shift the .S file's */\n\n\n#define SET_PTE movq %rdx, 8(%rsi)\n",
    )
    .unwrap();
    let src = "#include \"pt.h\"\n.text\n.globl f\nf:\n\tmovq %rdi, (%rsi)\n\tmovq (%rsi), %rax\n\tSET_PTE\n\tmovq 8(%rsi), %rax\n\tret\n";
    std::fs::write(d.join("x.S"), src).unwrap();
    let ann = serde_json::json!({"accesses": [
        {"file": "x.S", "line": 5, "kind": "pt_write"},
        {"file": "x.S", "line": 7, "kind": "pt_write"},
        {"file": "x.S", "line": 8, "kind": "pt_read"},
    ]});
    std::fs::write(d.join("ann.json"), ann.to_string()).unwrap();
    let obj = d.join("x.o");
    let st = Command::new(prefix.join("bin/x86_64-previrt-linux-gnu-gcc"))
        .args(["-c", "-g", "--annotations", s(&d.join("ann.json")), s(&d.join("x.S")), "-o", s(&obj)])
        .status()
        .expect("gcc (run scripts/install-deps.sh)");
    assert!(st.success());
    let rep = json_of(&previrt(&["toolchain", "report", s(&obj), "--json"]));
    let sites = &rep[0]["report"]["sites"];
    assert_eq!((sites["pt_write"].as_u64(), sites["pt_read"].as_u64()), (Some(2), Some(1)), "{sites}");
    assert_eq!(rep[0]["report"]["mismatches"], serde_json::json!([]));
}

/// `name=N` from a runtime summary line (0 when absent).
fn summary_count(line: &str, name: &str) -> u64 {
    line.split(' ').find_map(|w| w.strip_prefix(&format!("{name}=")[..])).map_or(0, |n| n.parse().unwrap())
}

/// Boot `vmlinux` with `initrd` under QEMU TCG (as scripts/linux-build.sh does) and return the
/// serial log once the kernel powers off or panics (at most 120 s).
fn boot_linux(vmlinux: &Path, initrd: &Path, log: &Path) -> String {
    common::require_tool("qemu-system-x86_64");
    let _ = std::fs::remove_file(log);
    let mut q = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc,accel=tcg", "-cpu", "max", "-m", "256", "-smp", "1", "-display", "none"])
        .args(["-vga", "none", "-monitor", "none", "-no-reboot", "-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (run scripts/install-deps.sh)");
    let end = ["reboot: Power down", "reboot: System halted", "Kernel panic", "Attempted to kill init"];
    let mut text = String::new();
    for _ in 0..1200 {
        text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if end.iter().any(|m| text.contains(m)) || q.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = q.kill();
    let _ = q.wait();
    text
}

/// Post-link memory sites in Linux are trampoline sites: the tinyconfig vmlinux of
/// scripts/linux-build.sh (cached; no DWARF, so the rules find the out-of-line accessors) gets
/// its accesses moved into trampolines in .text's int3 padding, TRAP only where the planner
/// says why, and boots to the same init output as the original.
#[test]
fn post_link_memory_sites_are_trampolines_in_linux() {
    let report = common::linux_build_report();
    let plain_dir = Path::new(report["boot"]["plain"]["log"].as_str().unwrap()).parent().unwrap().to_path_buf();
    let (vmlinux, initrd) = (plain_dir.join("vmlinux"), plain_dir.parent().unwrap().join("initramfs.cpio"));

    let d = scratch("linux");
    let out = d.join("vmlinux.ann");
    let r = json_of(&previrt(&["annotate", s(&vmlinux), "--patch", s(&out), "--json"]));
    let (sites, tramp) = (r["patched_sites"].as_u64().unwrap(), r["trampoline_sites"].as_u64().unwrap());
    let traps = r["trap_sites"].as_array().unwrap();
    assert!(sites > 0 && tramp * 10 >= sites * 8, "{tramp} of {sites} in trampolines: {traps:?}");
    assert_eq!(tramp as usize + traps.len(), sites as usize);
    let data = std::fs::read(&out).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let table = previrt_rewriter::sites::read(&elf).unwrap().expect("a site table");
    for site in &table.sites {
        assert_eq!(site.producer, Producer::Annotate);
        let rec = site.record;
        assert!(rec.has(flags::MEM) && Kind::from_u16(rec.kind).unwrap().name().starts_with(['m', 'p']), "{rec:?}");
        if rec.has(flags::TRAMPOLINE) {
            assert!(rec.site_len >= 5 && !rec.has(flags::TRAP), "{rec:?}");
        } else {
            assert!(rec.has(flags::TRAP) && rec.site_len == rec.insn_len, "{rec:?}");
        }
    }
    fn init(log: &str) -> Vec<&str> {
        log.lines().filter(|l| l.starts_with("previrt-init:")).map(str::trim_end).collect()
    }
    let plain = boot_linux(&vmlinux, &initrd, &d.join("plain.log"));
    let patched = boot_linux(&out, &initrd, &d.join("patched.log"));
    assert_eq!(init(&plain), ["previrt-init: hello"], "{plain}");
    assert_eq!(init(&patched), init(&plain), "{patched}");
    assert!(patched.contains("reboot: System halted") || patched.contains("reboot: Power down"), "{patched}");
}

#[test]
fn assembler_path_makes_annotated_lines_sites() {
    let k = example_kernel();
    let d = scratch("asm");
    let (ann, out) = annotated_kernel(&d);
    let rep = json_of(&previrt(&["toolchain", "report", s(&out.join("kernel-pvh.elf")), "--json"]));
    let sites = &rep[0]["report"]["sites"];
    for kind in ["mmio_read", "mmio_write", "pt_read", "pt_write"] {
        let want = ann["accesses"].as_array().unwrap().iter().filter(|a| a["kind"] == kind).count() as u64;
        assert_eq!(sites[kind].as_u64().unwrap_or(0), want, "{kind} sites vs annotations");
    }
    assert_eq!(rep[0]["report"]["mismatches"], serde_json::json!([]));
    let (plain, built) = (
        run_qemu(&k.pvh_elf(), "workloads=pagetable,mmio"),
        run_qemu(&out.join("kernel-pvh.elf"), "workloads=pagetable,mmio"),
    );
    assert_eq!(built.status, 0, "{}", built.stdout);
    assert_eq!(deterministic_lines(&built.stdout), deterministic_lines(&plain.stdout));

    // With the runtime's trace backend every memory-access site is counted and its original
    // executed: exactly as many as the hypervisor's profile of this image on the same workload
    // executes the annotated instructions (the runtime is appended after `__image_end`, so the
    // kernel maps the same pages). The profile's own counts equal them for MMIO; for page
    // tables they are fewer: stores into tables not linked yet (paging_init builds
    // kernel_pml4 before loading CR3, pt_alloc zeroes fresh tables) are not page-table traffic.
    let linked = d.join("linked.elf");
    let l = previrt(&["link", s(&out.join("kernel-pvh.elf")), "-o", s(&linked), "--backend", "trace"]);
    assert!(l.status.success(), "{}", String::from_utf8_lossy(&l.stderr));
    let traced = run_qemu(&linked, "workloads=mmio");
    assert_eq!(traced.status, 0, "{}", traced.stdout);
    let counts = traced.stdout.lines().find(|l| l.starts_with("previrt-trace:")).expect("trace summary line");
    let count = |kind: &str| summary_count(counts, kind);
    let (prof, p) = mmio_profile(&out.join("kernel-pvh.elf"), &d);
    let executed: std::collections::HashMap<u64, u64> =
        p["executed"].as_array().unwrap().iter().map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap())).collect();
    let built = annotations(&out.join("kernel-pvh.elf"), &d.join("built-ann.json"));
    for kind in ["mmio_read", "mmio_write", "pt_read", "pt_write"] {
        let sites = built["accesses"].as_array().unwrap().iter().filter(|a| a["kind"] == kind);
        let ran: u64 = sites.map(|a| executed.get(&a["address"].as_u64().unwrap()).copied().unwrap_or(0)).sum();
        assert!(count(kind) > 0, "{kind}: {counts}");
        assert_eq!(count(kind), ran, "{kind}: trace backend vs sites executed in the profile ({counts})");
        let traced = traced_count(&p, kind);
        assert!(traced > 0, "{kind}: nothing traced");
        if kind.starts_with("mmio") {
            assert_eq!(count(kind), traced, "{kind}: trace backend vs hypervisor profile ({counts})");
        } else {
            assert!(traced < count(kind), "{kind}: {traced} traced vs {counts}");
        }
    }

    // Profile -> build in one step: `gcc --annotations PROFILE` derives the annotations from
    // the image the profile names (written beside it) and builds with them.
    assert_eq!(Path::new(p["image"].as_str().unwrap()), out.join("kernel-pvh.elf").canonicalize().unwrap());
    let from_prof = d.join("kp");
    let cross = format!("{}/bin/x86_64-previrt-linux-gnu-", d.join("tc").display());
    let st = Command::new("make")
        .args(["-s", "-C", s(&kernel_src())])
        .arg(format!("O={}", from_prof.display()))
        .arg(format!("CROSS_COMPILE={cross}"))
        .arg(format!("CC={cross}gcc --annotations {}", prof.display()))
        .status()
        .expect("make (run scripts/install-deps.sh)");
    assert!(st.success());
    let derived: Value = serde_json::from_slice(&std::fs::read(d.join("profile.annotations.json")).unwrap()).unwrap();
    assert!(derived["found"]["profile"].as_u64().unwrap() > 0, "{}", derived["found"]);
    let rep = json_of(&previrt(&["toolchain", "report", s(&from_prof.join("kernel-pvh.elf")), "--json"]));
    for kind in ["mmio_read", "mmio_write", "pt_read", "pt_write"] {
        let want = derived["accesses"].as_array().unwrap().iter().filter(|a| a["kind"] == kind).count() as u64;
        assert!(want > 0, "{kind}");
        assert_eq!(
            rep[0]["report"]["sites"][kind].as_u64().unwrap_or(0),
            want,
            "{kind} sites vs profile-derived annotations"
        );
    }
}

/// `previrt run` of a linked kernel under the `hv` backend: stdout and the --stats-json.
fn hv_run(linked: &Path, append: &str, stats: &Path) -> (String, Value) {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm missing: run scripts/install-deps.sh on a KVM host");
    let o = previrt(&["run", "--boot", "pvh", s(linked), "--append", append, "--stats-json", s(stats)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("RESULT PASS"), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("previrt: backend=hv "), "{out}");
    (out, serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap())
}

/// The exit-reduction direction for MMIO: the example kernel pre-virtualized without memory
/// sites sends every LAPIC access to the device (KVM's in-kernel LAPIC); with the
/// annotations' sites, the `hv` backend serves ID, version and TPR from its in-guest copy and
/// only the reads that seed the copy reach the device. Same verdicts and checksums as the
/// plain kernel. KVM's own counters are read (they show what the VMM's exit table cannot).
#[test]
fn hv_backend_serves_lapic_registers_in_guest() {
    let d = scratch("hv-mmio");
    let (_, out) = annotated_kernel(&d);
    let with = d.join("with.elf");
    let l = previrt(&["link", s(&out.join("kernel-pvh.elf")), "-o", s(&with)]);
    assert!(l.status.success(), "{}", String::from_utf8_lossy(&l.stderr));
    let append = "previrt.backend=hv hz=100 workloads=mmio repeat=2";
    let plain = run_qemu(&example_kernel().pvh_elf(), "hz=100 workloads=mmio repeat=2");
    let (without_out, without) = hv_run(common::linked_example_kernel(), append, &d.join("without.json"));
    let (with_out, with_stats) = hv_run(&with, append, &d.join("with.json"));
    assert_eq!(workload_lines(&with_out), workload_lines(&plain.stdout), "with memory sites vs QEMU");
    assert_eq!(workload_lines(&without_out), workload_lines(&plain.stdout), "without memory sites vs QEMU");

    let line = |out: &str, prefix: &str| out.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_string();
    let (trace, hv) = (line(&with_out, "previrt-trace:"), line(&with_out, "previrt-hv:"));
    let executed = summary_count(&trace, "mmio_read") + summary_count(&trace, "mmio_write");
    let served = summary_count(&hv, "lapic-in-guest");
    assert!(executed > 0, "no MMIO site ran: {trace}");
    assert_eq!(
        summary_count(&line(&without_out, "previrt-trace:"), "mmio_read"),
        0,
        "the plain toolchain build has no memory sites"
    );
    // Without memory sites all `executed` accesses reach the LAPIC; with them, at most one
    // seeding read per modelled register (ID, version, TPR).
    let reach_device = executed - served;
    assert!(
        reach_device < executed && reach_device <= 3,
        "LAPIC accesses reaching the device: {reach_device} of {executed} ({hv})"
    );
    for st in [&without, &with_stats] {
        assert!(st["kvm"]["exits"].as_u64().is_some(), "KVM binary stats (KVM_GET_STATS_FD) missing: {}", st["kvm"]);
    }
}

#[test]
fn bad_input_is_one_line_and_status_2() {
    let d = scratch("bad");
    let junk = d.join("junk");
    std::fs::write(&junk, b"not an elf").unwrap();
    let k = example_kernel();
    for args in [
        vec!["annotate", "/nonexistent/vmlinux"],
        vec!["annotate", s(&junk)],
        vec!["annotate", s(&k.pvh_elf()), "--profile", s(&junk)],
    ] {
        let o = previrt(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("previrt annotate: "), "{err}");
    }
}

//! `previrt scan` from the outside: exit status, one-line errors, tables, --list, --json,
//! directory walks and coverage fields.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn previrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_previrt"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("scan-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assemble(dir: &Path, stem: &str, src: &str, flags: &[&str]) -> PathBuf {
    let ok = Command::new("as").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "GNU `as` is missing: run scripts/install-deps.sh (it installs binutils)");
    let s = dir.join(format!("{stem}.s"));
    let o = dir.join(format!("{stem}.o"));
    std::fs::write(&s, src).unwrap();
    let out = Command::new("as").args(flags).arg("-o").arg(&o).arg(&s).output().unwrap();
    assert!(out.status.success(), "as: {}", String::from_utf8_lossy(&out.stderr));
    o
}

fn scan(args: &[&str], paths: &[&Path]) -> Output {
    previrt().arg("scan").args(args).args(paths).output().unwrap()
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr).lines().map(str::to_string).collect()
}

const GOOD: &str = ".text\n.globl f\nf:\n\tcli\n\tsti\n\tsti\n\tout %al,$0x80\n\trdtsc\n\tret\n";

#[test]
fn not_elf_is_exit_2_with_one_line() {
    let dir = scratch("notelf");
    let p = dir.join("hello.txt");
    std::fs::write(&p, "hello, world\n").unwrap();
    let o = scan(&[], &[&p]);
    assert_eq!(o.status.code(), Some(2));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&*p.to_string_lossy()) && lines[0].contains("not an ELF file"), "{lines:?}");
}

#[test]
fn truncated_is_exit_2_with_one_line() {
    let dir = scratch("trunc");
    let o = assemble(&dir, "good", GOOD, &["--64"]);
    let data = std::fs::read(&o).unwrap();
    for len in [10, 40, data.len() / 2, data.len() - 1] {
        let p = dir.join(format!("cut{len}.o"));
        std::fs::write(&p, &data[..len]).unwrap();
        let out = scan(&[], &[&p]);
        assert_eq!(out.status.code(), Some(2), "length {len}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(&*p.to_string_lossy()) && lines[0].contains("truncated"), "{lines:?}");
    }
}

#[test]
fn i386_is_exit_2_with_one_line() {
    let dir = scratch("i386");
    let o = assemble(&dir, "x32", ".text\n\tcli\n\tpushfl\n", &["--32"]);
    let out = scan(&[], &[&o]);
    assert_eq!(out.status.code(), Some(2));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("not x86-64") && lines[0].contains("i386"), "{lines:?}");
}

#[test]
fn missing_path_is_exit_2() {
    let out = scan(&[], &[Path::new("/nonexistent/previrt-scan-test")]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr_lines(&out).len(), 1);
}

#[test]
fn table_list_and_json_of_one_object() {
    let dir = scratch("good");
    let o = assemble(&dir, "good", GOOD, &["--64"]);

    let t = scan(&[], &[&o]);
    assert_eq!(t.status.code(), Some(0), "{}", String::from_utf8_lossy(&t.stderr));
    let text = String::from_utf8(t.stdout).unwrap();
    assert!(text.contains("sti") && text.contains(".text"), "{text}");
    let sti_line = text.lines().find(|l| l.starts_with("sti ")).unwrap();
    assert!(sti_line.split_whitespace().any(|w| w == "2"), "{sti_line}");

    let l = scan(&["--list"], &[&o]);
    assert_eq!(l.status.code(), Some(0));
    let list = String::from_utf8(l.stdout).unwrap();
    let out_line = list.lines().find(|l| l.ends_with("\tout")).unwrap();
    let cols: Vec<&str> = out_line.split('\t').collect();
    assert_eq!(cols[1], ".text");
    assert_eq!(cols[2], "0x3");
    assert_eq!(cols[4], "f+0x3");
    assert_eq!(cols[5], "e6 80");
    assert_eq!(cols[6], "out %al,$0x80");

    let j = scan(&["--json", "--list"], &[&o]);
    assert_eq!(j.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["schema"], "previrt-scan/1");
    let f = &v["files"][0];
    assert_eq!(f["elf_type"], "rel");
    assert_eq!(f["counts"]["cli"], 1);
    assert_eq!(f["counts"]["sti"], 2);
    assert_eq!(f["counts"]["out"], 1);
    assert_eq!(f["counts"]["rdtsc"], 1);
    assert_eq!(f["total"], 5);
    assert!(f.get("covered").is_none() && f.get("uncovered").is_none(), "no site table: no coverage fields");
    let hits = f["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[4]["kind"], "rdtsc");
    assert_eq!(hits[4]["patched_by_default"], false);
    assert_eq!(v["totals"]["total"], 5);
    assert_eq!(v["errors"].as_array().unwrap().len(), 0);
}

#[test]
fn directory_walk_counts_good_files_and_lists_bad_ones_at_the_end() {
    let dir = scratch("dir");
    let sub = dir.join("a/b");
    std::fs::create_dir_all(&sub).unwrap();
    assemble(&dir, "one", GOOD, &["--64"]);
    assemble(&sub, "two", ".text\n\thlt\n\tcpuid\n", &["--64"]);
    assemble(&sub, "old", ".text\n\tcli\n", &["--32"]);
    std::fs::write(dir.join("README"), "not elf, skipped silently\n").unwrap();
    // A file with the ELF magic but cut short: bad.
    std::fs::write(sub.join("cut.ko"), b"\x7fELF\x02\x01\x01").unwrap();

    let out = scan(&["--json"], &[&dir]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{v:#}");
    assert_eq!(v["totals"]["counts"]["sti"], 2);
    assert_eq!(v["totals"]["counts"]["hlt"], 1);
    assert_eq!(v["totals"]["counts"]["cpuid"], 1);
    let errs = v["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2);
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("old.o") && l.contains("not x86-64")));
    assert!(lines.iter().any(|l| l.contains("cut.ko") && l.contains("truncated")));
    assert!(!lines.iter().any(|l| l.contains("README")));

    // The text form: a per-file table, totals, and the errors last on stderr.
    let t = scan(&[], &[&dir]);
    assert_eq!(t.status.code(), Some(2));
    let text = String::from_utf8(t.stdout).unwrap();
    assert!(text.contains("2 files"), "{text}");
}

#[test]
fn coverage_fields_for_a_file_with_a_site_table() {
    let dir = scratch("cov");
    let src = "
.text
1:  cli
    nop; nop; nop; nop
2:  sti
    ret
.pushsection .previrt.sites,\"a\",@progbits
    .long 0x54535650
    .short 1, 32
    .long 1
    .short 1, 0
    .long 1b - .
    .long 0
    .short 1, 1
    .byte 5, 1, 0, 0, 0, 0, 0, 0
    .long 0
    .long 2b - .
    .long 1b - .
.popsection
";
    let o = assemble(&dir, "sites", src, &["--64"]);
    let out = scan(&["--json"], &[&o]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &v["files"][0];
    assert_eq!(f["covered"], 1);
    let unc = f["uncovered"].as_array().unwrap();
    assert_eq!(unc.len(), 1);
    assert_eq!(unc[0]["kind"], "sti");
    assert_eq!(unc[0]["section"], ".text");
    assert_eq!(unc[0]["offset"], 5);
    assert_eq!(unc[0]["reason"], "no_site");

    let t = scan(&[], &[&o]);
    let text = String::from_utf8(t.stdout).unwrap();
    assert!(text.contains("1 of 2 sensitive instructions covered, 1 uncovered (no_site 1)"), "{text}");
}

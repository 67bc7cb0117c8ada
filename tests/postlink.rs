//! The post-link patcher on objects assembled here with the system `as`: sensitive
//! instructions next to branch targets, RIP-relative neighbours, a jump table, exception-table,
//! alternatives and paravirt entries. Patched objects must pass `previrt verify`, fail it after
//! any one-byte corruption, and — linked with `ld` — run exactly like the unpatched program.

mod common;

use common::require_tool;
use previrt_postlink::{patch, verify, Options};
use previrt_rewriter::elf::Elf;
use previrt_rewriter::sites::read as read_sites;
use previrt_site_abi::{flags, Kind};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("previrt-postlink-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}; run scripts/install-deps.sh"));
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn assemble(dir: &Path, name: &str, src: &str) -> PathBuf {
    require_tool("as");
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    std::fs::write(&s, src).unwrap();
    run_ok(Command::new("as").arg("--64").arg("-o").arg(&o).arg(&s), "as");
    o
}

fn link(dir: &Path, obj: &Path, name: &str) -> PathBuf {
    require_tool("ld");
    let exe = dir.join(name);
    run_ok(Command::new("ld").arg("-static").arg("-o").arg(&exe).arg(obj), "ld");
    exe
}

fn previrt(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_previrt")).args(args).output().expect("running previrt")
}

/// A user-space program whose sensitive instructions are all unprivileged (pushf, popf,
/// cpuid, rdtsc): it must print the same checksum patched and unpatched.
const PROGRAM: &str = r#"
    .text
    .globl _start
_start:
    xor %r12d, %r12d
    mov $100, %r13d
1:  pushfq                       # a branch target right at the sensitive instruction
    pop %rax
    and $0x8d5, %eax
    add %rax, %r12
    lea table(%rip), %rdx        # RIP-relative neighbour
    mov %r13d, %eax
    and $3, %eax
    jmp *(%rdx,%rax,8)           # jump table: its targets come from R_X86_64_64 relocations
case0:
    add $1, %r12
    jmp 2f
case1:
    add $7, %r12
    jmp 2f
case2:
    pushfq
    popfq                        # sensitive, followed by a branch-free run
    add $13, %r12
    jmp 2f
case3:
    add counter(%rip), %r12
    incq counter(%rip)
2:  xor %eax, %eax
    xor %ecx, %ecx
    cpuid
fault:
    add %rbx, %r12               # pinned by __ex_table: never moved
    rdtsc                        # time class: moved only with --time
    shl $32, %rdx
    dec %r13d
    jnz 1b
    call func
    add %rax, %r12
    lea buf+16(%rip), %rsi
    mov $16, %ecx
3:  mov %r12, %rax
    and $15, %eax
    movzbl hex(%rax), %eax
    dec %rsi
    mov %al, (%rsi)
    shr $4, %r12
    dec %ecx
    jnz 3b
    mov $1, %eax
    mov $1, %edi
    mov $17, %edx
    syscall
    mov $60, %eax
    mov $3, %edi
    syscall
func:
    pushfq
    popfq
    mov $0x1234, %eax
    ret
fixup:
    ud2

    .section __ex_table,"a"
    .long fault - .
    .long fixup - .
    .long 0

    .section .rodata
    .balign 8
table: .quad case0, case1, case2, case3
hex:   .ascii "0123456789abcdef"

    .data
counter: .quad 5
buf:     .ascii "................\n"
"#;

fn run(exe: &Path) -> (Option<i32>, Vec<u8>) {
    let o = Command::new(exe).output().unwrap();
    (o.status.code(), o.stdout)
}

#[test]
fn patched_program_runs_identically_and_verifies() {
    let dir = tmpdir("program");
    let obj = assemble(&dir, "prog", PROGRAM);
    let orig = std::fs::read(&obj).unwrap();
    for (name, opts) in [("default", Options::default()), ("time", Options { time: true })] {
        let p = patch(&orig, &opts).expect("patch");
        let r = &p.report;
        assert!(r.trampolines >= 4, "{name}: expected pushf/popf/cpuid trampolines: {r:?}");
        assert_eq!(r.coverage, 100.0, "{name}: {r:?}");
        assert_eq!(r.by_kind.get("rdtsc").map_or(0, |c| c.trampoline + c.trap), opts.time as usize, "{name}");
        let v = verify(&orig, &p.data).unwrap();
        assert!(v.ok, "{name}: {:?}", v.problems);
        assert_eq!(v.covered, v.sensitive);
        let patched = dir.join(format!("prog-{name}.o"));
        std::fs::write(&patched, &p.data).unwrap();
        let (a, b) = (link(&dir, &obj, "plain"), link(&dir, &patched, &format!("patched-{name}")));
        let (plain, pv) = (run(&a), run(&b));
        assert_eq!(plain.0, Some(3));
        assert_eq!(plain.1.len(), 17, "program output: {:?}", String::from_utf8_lossy(&plain.1));
        assert_eq!(plain, pv, "{name}: patched program behaves differently");

        // The linked executable's site table points at the moved instructions.
        let exe = std::fs::read(&b).unwrap();
        let elf = Elf::parse(&exe).unwrap();
        let table = read_sites(&elf).unwrap().expect("linked site table");
        assert_eq!(table.sites.len(), r.sites);
        for s in &table.sites {
            let (sec, off) = s.site.section_offset().expect("site inside a section");
            let code = &elf.sections[sec].data[off as usize..];
            let mut d =
                previrt_rewriter::iced_x86::Decoder::new(64, code, previrt_rewriter::iced_x86::DecoderOptions::NONE);
            let kind = previrt_rewriter::classify(&d.decode()).map(|e| e.kind as u16);
            assert_eq!(kind, Some(s.record.kind), "site at {:?} is not the recorded instruction", s.site);
            assert!(
                s.record.has(flags::TRAP)
                    || code[s.record.insn_len as usize..s.record.site_len as usize].iter().all(|&b| b == 0x90)
            );
        }
    }
}

#[test]
fn windows_respect_branch_targets_and_tables() {
    let dir = tmpdir("windows");
    let obj = assemble(&dir, "prog", PROGRAM);
    let orig = std::fs::read(&obj).unwrap();
    let p = patch(&orig, &Options::default()).unwrap();
    let elf = Elf::parse(&p.data).unwrap();
    let table = read_sites(&elf).unwrap().unwrap();
    let text = elf.section_by_name(".text").unwrap();
    let sym = |n: &str| elf.symbols_in(text.index).iter().find(|s| s.name == n.as_bytes()).unwrap().offset;
    let (fault, case2) = (sym("fault"), sym("case2"));
    for s in &table.sites {
        let (_, origin) = s.origin.section_offset().unwrap();
        let (_, resume) = s.resume.section_offset().unwrap();
        if s.record.has(flags::TRAMPOLINE) {
            // The __ex_table instruction is never inside a window; a label only starts one.
            assert!(
                !(origin..resume).contains(&fault),
                "window {origin:#x}..{resume:#x} moves the exception-table instruction"
            );
            assert!(!(origin + 1..resume).contains(&case2), "window {origin:#x}..{resume:#x} swallows the case2 label");
            assert!(resume - origin >= 5);
        }
    }
    // `cpuid` sits right before the pinned instruction and after a branch target: its window
    // must extend backwards over the two `xor`s.
    let cpuid = table.sites.iter().find(|s| s.kind() == Some(Kind::Cpuid)).unwrap();
    assert!(cpuid.record.has(flags::TRAMPOLINE));
    assert_eq!(cpuid.resume.section_offset().unwrap().1, fault);
}

#[test]
fn verify_fails_on_any_one_byte_corruption() {
    let dir = tmpdir("corrupt");
    let obj = assemble(&dir, "prog", PROGRAM);
    let orig = std::fs::read(&obj).unwrap();
    let p = patch(&orig, &Options::default()).unwrap();
    let elf = Elf::parse(&p.data).unwrap();
    let text = elf.section_by_name(".text").unwrap();
    let text_off = text.data.as_ptr() as usize - p.data.as_ptr() as usize;
    let orig_text_len = Elf::parse(&orig).unwrap().section_by_name(".text").unwrap().data.len();
    let sites = elf.section_by_name(".previrt.sites").unwrap();
    let sites_off = sites.data.as_ptr() as usize - p.data.as_ptr() as usize;
    let rela = elf.section_by_name(".rela.text").unwrap();
    let rela_off = rela.data.as_ptr() as usize - p.data.as_ptr() as usize;
    let table = read_sites(&elf).unwrap().unwrap();
    let window =
        table.sites.iter().find(|s| s.record.has(flags::TRAMPOLINE)).unwrap().origin.section_offset().unwrap().1
            as usize;
    let cases = [
        ("unmoved code byte", text_off + 2),
        ("window jump", text_off + window + 1),
        ("trampoline byte", text_off + orig_text_len + 1),
        ("trampoline padding", text_off + text.data.len() - 6),
        ("site record kind", sites_off + 16 + 8),
        ("relocation offset", rela_off + 24),
        ("relocation addend", rela_off + 16),
    ];
    for (what, at) in cases {
        let mut bad = p.data.clone();
        bad[at] ^= 0x01;
        let v = verify(&orig, &bad).unwrap();
        assert!(!v.ok, "verify passed with a corrupted {what} (file offset {at:#x})");
    }
    // The CLI says so with exit status 1, and 0 for the good file.
    let (o, good, bad) = (obj.clone(), dir.join("good.o"), dir.join("bad.o"));
    std::fs::write(&good, &p.data).unwrap();
    let mut b = p.data.clone();
    b[text_off + 2] ^= 1;
    std::fs::write(&bad, &b).unwrap();
    assert_eq!(previrt(&["verify".as_ref(), o.as_os_str(), good.as_os_str()]).status.code(), Some(0));
    assert_eq!(previrt(&["verify".as_ref(), o.as_os_str(), bad.as_os_str()]).status.code(), Some(1));
    assert_eq!(previrt(&["verify".as_ref(), o.as_os_str(), dir.join("prog.s").as_os_str()]).status.code(), Some(2));
}

/// A module-like object: a paravirt call site, an alternative whose original holds `cli`
/// and whose replacement holds `sti`, a `pushf` with enough movable neighbours, `sti; hlt`.
const KO: &str = r#"
    .text
    .globl f
f:
    mov %rdi, %rax
    add $1, %rax
    pushfq
    pop %rax
    sti
    hlt
    ret
g:
661: call *pv_ops+8(%rip)
662:
    ret
h:
771: cli
    nop
    nop
772:
    ret

    .section .parainstructions,"a"
    .balign 8
    .quad 661b
    .byte 1, 662b-661b
    .balign 8

    .section .altinstructions,"a"
    .long 771b - .
    .long 881f - .
    .word 0
    .byte 772b-771b, 882f-881f

    .section .altinstr_replacement,"ax"
881: sti
    nop
    nop
882:

    .data
pv_ops: .zero 64
"#;

#[test]
fn module_tables_pv_and_alternatives() {
    let dir = tmpdir("ko");
    let obj = assemble(&dir, "mod", KO);
    let orig = std::fs::read(&obj).unwrap();
    let p = patch(&orig, &Options::default()).unwrap();
    let v = verify(&orig, &p.data).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    let elf = Elf::parse(&p.data).unwrap();
    let table = read_sites(&elf).unwrap().unwrap();
    let name = |s: &previrt_rewriter::sites::Site| elf.sections[s.site.section_offset().unwrap().0].name.to_string();
    let find = |k: Kind, sec: &str| {
        table
            .sites
            .iter()
            .find(|s| s.kind() == Some(k) && name(s) == sec)
            .unwrap_or_else(|| panic!("no {k:?} site in {sec}"))
    };
    let pv = find(Kind::PvCall, ".text");
    assert!(!pv.record.has(flags::TRAP) && !pv.record.has(flags::TRAMPOLINE));
    assert_eq!((pv.record.site_len, pv.record.insn_len), (6, 6));
    let alt_orig = find(Kind::Cli, ".text");
    assert!(alt_orig.record.has(flags::TRAP), "cli inside an alternatives original is pinned");
    let repl = find(Kind::Sti, ".altinstr_replacement");
    assert!(repl.record.has(flags::TRAP) && repl.record.has(flags::IN_ALTINSTR));
    let moved = find(Kind::Pushf, ".text");
    assert!(moved.record.has(flags::TRAMPOLINE) && moved.record.site_len >= 5);
    // `sti; hlt`: the halt must stay in sti's interrupt shadow, so sti is never moved.
    let sti = find(Kind::Sti, ".text");
    assert!(sti.record.has(flags::TRAP));
    assert!(p.report.fallbacks.iter().any(|f| f.kind == "sti" && f.reason.contains("interrupt shadow")));
    assert_eq!(p.report.sites, 6);
    assert_eq!(p.report.pv_sites, 1);
}

#[test]
fn signatures_are_stripped_and_said_so() {
    let dir = tmpdir("sig");
    let obj = assemble(&dir, "mod", KO);
    let mut signed = std::fs::read(&obj).unwrap();
    let sig = [0x5a; 40];
    signed.extend_from_slice(&sig);
    signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
    signed.extend_from_slice(&(sig.len() as u32).to_be_bytes());
    signed.extend_from_slice(previrt_postlink::write::SIG_MARKER);
    let input = dir.join("signed.ko");
    std::fs::write(&input, &signed).unwrap();
    let out = dir.join("out.ko");
    let o = previrt(&["patch".as_ref(), input.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("signature"), "the output must say the signature was removed");
    let patched = std::fs::read(&out).unwrap();
    assert!(!patched.ends_with(previrt_postlink::write::SIG_MARKER));
    assert_eq!(std::fs::read(&input).unwrap(), signed, "input modified");
    assert!(verify(&signed, &patched).unwrap().ok);
}

#[test]
fn refuses_what_it_cannot_handle() {
    let dir = tmpdir("refuse");
    // A GOT-relative relocation: not a type the patcher knows.
    let obj = assemble(&dir, "got", "    .text\n    cli\n    mov foo@GOTPCREL(%rip), %rax\n    ret\n");
    let out = dir.join("got.out");
    let o = previrt(&["patch".as_ref(), obj.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("unsupported relocation type 42") && text.lines().count() == 1, "{text}");
    assert!(!out.exists(), "no output for a refused file");
    // Never the input itself, never a non-ELF file.
    let good = assemble(&dir, "good", KO);
    let o = previrt(&["patch".as_ref(), good.as_os_str(), "-o".as_ref(), good.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    let src = dir.join("good.s");
    let o = previrt(&["patch".as_ref(), src.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn directories_in_parallel_with_json_summary() {
    let dir = tmpdir("dir");
    let inp = dir.join("in");
    std::fs::create_dir_all(inp.join("sub")).unwrap();
    let a = assemble(&dir, "a", PROGRAM);
    let b = assemble(&dir, "b", KO);
    std::fs::copy(&a, inp.join("a.o")).unwrap();
    std::fs::copy(&b, inp.join("sub/b.ko")).unwrap();
    std::fs::write(inp.join("notes.txt"), "not ELF").unwrap();
    let out = dir.join("out");
    let o = previrt(&["patch".as_ref(), inp.as_os_str(), "-o".as_ref(), out.as_os_str(), "--json".as_ref()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["summary"]["files"], 2);
    assert_eq!(j["summary"]["refused"], 0);
    assert_eq!(j["summary"]["coverage"], 100.0);
    assert!(j["summary"]["by_kind"]["pushf"]["trampoline"].as_u64().unwrap() >= 2);
    assert!(out.join("sub/b.ko").exists());
    let v = previrt(&["verify".as_ref(), inp.as_os_str(), out.as_os_str(), "--json".as_ref()]);
    assert_eq!(v.status.code(), Some(0));
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!((j["files"].as_u64(), j["passed"].as_u64()), (Some(2), Some(2)));
}

/// Mutated objects: `patch` and `verify` give a result or an error, never a panic.
#[test]
fn mutated_inputs_never_panic() {
    let dir = tmpdir("fuzz");
    let inputs =
        [std::fs::read(assemble(&dir, "prog", PROGRAM)).unwrap(), std::fs::read(assemble(&dir, "mod", KO)).unwrap()];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut patched, mut refused) = (0, 0);
    for round in 0..2000 {
        let orig = &inputs[round % 2];
        let mut m = orig.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % m.len() as u64) as usize;
            m[at] = next() as u8;
        }
        let result = std::panic::catch_unwind(|| {
            let p = patch(&m, &Options::default());
            if let Ok(p) = &p {
                let _ = verify(&m, &p.data);
            }
            let _ = verify(orig, &m);
            p.is_ok()
        });
        match result {
            Ok(true) => patched += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("round {round}: panic on a mutated input"),
        }
    }
    assert!(patched > 0 && refused > 0, "{patched} patched, {refused} refused");
}

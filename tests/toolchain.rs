//! The CROSS_COMPILE toolchain: the text rewriter on tricky inputs, our `as` end to end with
//! the system assembler (every sensitive form covered, record operands right, `.byte`-encoded
//! instructions reported, errors and unknown syntax passed through, debug info kept), the gcc
//! wrapper and the multi-call dispatch.

use previrt_rewriter::elf::Elf;
use previrt_rewriter::scan::scan_elf;
use previrt_rewriter::sites;
use previrt_site_abi::flags;
use previrt_toolchain::text::{Config, Rewriter, Stats};
use previrt_toolchain::{tool_for, Tool};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const CFG: Config = Config { min_site_len: 5, code64: true, intel: false };

fn rewrite(src: &str) -> (String, Stats) {
    rewrite_with(CFG, src)
}

fn rewrite_with(cfg: Config, src: &str) -> (String, Stats) {
    let mut rw = Rewriter::new(cfg);
    rw.feed(None, src.as_bytes());
    let (out, stats) = rw.finish();
    (String::from_utf8(out).unwrap(), stats)
}

fn sites_of(stats: &Stats) -> Vec<(&str, u32)> {
    stats.sites.iter().map(|(k, n)| (*k, *n)).collect()
}

/// A scratch directory per test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("previrt-toolchain-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The toolchain installed once for this test process.
fn prefix() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = scratch("prefix");
        let out = Command::new(env!("CARGO_BIN_EXE_previrt"))
            .args(["toolchain", "install", "--prefix"])
            .arg(&d)
            .output()
            .unwrap();
        assert!(out.status.success(), "install: {}", String::from_utf8_lossy(&out.stderr));
        d
    })
}

fn our_as() -> PathBuf {
    prefix().join("libexec/previrt/as")
}

fn tool(name: &str) -> PathBuf {
    prefix().join(format!("bin/x86_64-previrt-linux-gnu-{name}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (binutils/gcc missing? run scripts/install-deps.sh)"))
}

/// Assemble `src` with our `as` (logging to a file); returns the object bytes and the log line.
fn assemble(dir: &Path, src: &str, extra: &[&str]) -> (Vec<u8>, serde_json::Value) {
    let (s, o, log) = (dir.join("t.s"), dir.join("t.o"), dir.join("log.jsonl"));
    std::fs::write(&s, src).unwrap();
    let _ = std::fs::remove_file(&log);
    let out = run(Command::new(our_as()).args(extra).arg("-o").arg(&o).arg(&s).env("PREVIRT_LOG", &log));
    assert!(out.status.success(), "our as failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = std::fs::read_to_string(&log).expect("log written");
    (std::fs::read(&o).unwrap(), serde_json::from_str(line.lines().last().unwrap()).unwrap())
}

#[test]
fn prefixes_suffixes_and_statement_separators() {
    let (out, stats) = rewrite("\trep; outsb\n\trep insw\n\tcli; sti ; nop\n\tpushfq\n\tlock incl (%rax)\n\tiretq\n");
    assert_eq!(sites_of(&stats), [("cli", 1), ("ins", 1), ("iret", 1), ("outs", 1), ("pushf", 1), ("sti", 1)]);
    // The site label goes before the prefix statement of `rep; outsb`.
    assert!(out.contains("7771: rep; outsb ; 7772:"), "{out}");
    assert!(out.contains("7771: rep insw ; 7772:"), "{out}");
    // Every statement stays on its own line: line numbers do not move.
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[4].trim() == "lock incl (%rax)" && lines[5].contains("7771: iretq"));
    assert_eq!(lines.len(), 6 + 1, "input lines plus the trailing chunk header");
}

#[test]
fn comments_strings_and_char_constants_are_not_sites() {
    let src = "\t# cli\n\tnop /* cli */ ; hlt\n/* multi\n cli\n*/ sti\n\t.ascii \"cli; sti\\\"; cpuid\"\n\tmovb $';', %al ; wrmsr\n/ cli at line start is a comment\n\tmovl $0, %eax # cpuid\n";
    let (_, stats) = rewrite(src);
    assert_eq!(sites_of(&stats), [("hlt", 1), ("sti", 1), ("wrmsr", 1)]);
}

#[test]
fn special_register_moves_but_not_ordinary_ones() {
    let (_, stats) = rewrite(
        "mov %cr3,%rax\nmovq %rax,%dr7\nmovw %ax,%ds\nmovl %es:(%rax),%eax\nmovq %fs:0x28,%rax\npush %fs\npushq %rax\npop %gs\nljmp *(%rax)\njmp *%rax\nint $3\nint3\nrdtsc\ncli = 3\n",
    );
    assert_eq!(
        sites_of(&stats),
        [("far_jmp", 1), ("int", 1), ("mov_cr", 1), ("mov_dr", 1), ("mov_seg", 1), ("pop_seg", 1), ("push_seg", 1)]
    );
}

#[test]
fn intel_syntax_regions() {
    let (out, stats) = rewrite(".intel_syntax noprefix\nmov cr3, rax\nin al, dx\npush fs\njmp fword ptr [rax]\nmov rax, QWORD PTR fs:0x28\n.att_syntax\ncli\n");
    assert_eq!(sites_of(&stats), [("cli", 1), ("far_jmp", 1), ("in", 1), ("mov_cr", 1), ("push_seg", 1)]);
    // Record directives are written in AT&T syntax and the Intel mode is re-entered.
    assert!(out.contains(".att_syntax prefix ; .pushsection"));
    assert!(out.contains(".popsection ; .intel_syntax noprefix"));
}

#[test]
fn sections_decide_what_is_code() {
    let src = "\t.data\n\tcli\n\t.pushsection .altinstr_replacement,\"ax\"\n\tsti\n\t.popsection\n\tcli\n\t.section .init.text,\"ax\",@progbits\n\thlt\n\t.previous\n\tcli\n\t.section .rodata.x,\"a\"\n\tcpuid\n\t.text\n\twrmsr\n\t.section .text.unlikely\n\trdmsr\n";
    let (_, stats) = rewrite(src);
    assert_eq!(sites_of(&stats), [("hlt", 1), ("rdmsr", 1), ("sti", 1), ("wrmsr", 1)]);
}

#[test]
fn code16_and_code32_are_left_alone_and_reported() {
    let (_, stats) = rewrite("\t.code32\n\tcli\n\tmovl %eax,%cr3\n\t.code64\n\tcli\n\t.code16gcc\n\tinb $0x60,%al\n");
    assert_eq!(sites_of(&stats), [("cli", 1)]);
    let at: Vec<_> = stats.narrow_code.iter().map(|n| (n.at.as_str(), n.kind)).collect();
    assert_eq!(at, [("-:2", "cli"), ("-:3", "mov_cr"), ("-:7", "in")]);
    let (out, stats) = rewrite_with(Config { code64: false, ..CFG }, "\tcli\n\tsti\n");
    assert_eq!((stats.total(), stats.narrow_code.len()), (0, 2));
    assert_eq!(out, "\tcli\n\tsti\n", "32-bit input passes through unchanged");
}

#[test]
fn macro_bodies_are_rewritten_once_per_expansion() {
    let dir = scratch("macro");
    let src = "\t.macro IRQOFF reg\n\tpushf\n\tpop \\reg\n\tcli\n\t.endm\n\t.text\nf:\n\tIRQOFF %rax\n\tIRQOFF %rbx\n\t.rept 3\n\thlt\n\t.endr\n\tret\n";
    let (obj, log) = assemble(&dir, src, &["--64"]);
    assert_eq!(log["text"]["macro_sites"], 2);
    let r = &log["object_report"];
    assert_eq!(r["sites"]["pushf"], 2);
    assert_eq!(r["sites"]["cli"], 2);
    assert_eq!(r["sites"]["hlt"], 3);
    assert_eq!((r["found"].as_u64(), r["covered"].as_u64()), (Some(7), Some(7)));
    let (_, cov) = sites::check_object(&obj).unwrap().unwrap();
    assert!(cov.uncovered.is_empty(), "{:?}", cov.uncovered);

    // A parameter used as the mnemonic (Linux's msr-reg.S): a site for each sensitive
    // mnemonic the file passes, the plain instruction for anything else.
    let src = ".macro op_safe_regs op\n\\op\\()_safe_regs:\n1:\t\\op\n\tret\n.endm\n\t.text\nop_safe_regs rdmsr\nop_safe_regs wrmsr\nop_safe_regs nop\n";
    let (obj, log) = assemble(&dir, src, &["--64"]);
    let r = &log["object_report"];
    assert_eq!((r["sites"]["rdmsr"].as_u64(), r["sites"]["wrmsr"].as_u64()), (Some(1), Some(1)));
    assert_eq!((r["found"].as_u64(), r["covered"].as_u64()), (Some(2), Some(2)));
    let elf = Elf::parse(&obj).unwrap();
    assert_eq!(elf.section_by_name(".text").unwrap().size, 2 * (5 + 1) + 2, "nop_safe_regs is not padded");

    // A parameter passed on to another macro (OUTER hands its \insn to INNER, as the
    // fixtures' CASE macros do): a site for every mnemonic either is given, through both
    // levels. (It was a plain, uncovered `cli`.)
    let src = ".macro INNER insn:vararg\n\t\\insn\n.endm\n.macro OUTER n, insn:vararg\n\tINNER \\insn\n.endm\n\t.text\n\tINNER sti\n\tOUTER 1, cli\n\tOUTER 2, nop\n";
    let (_, log) = assemble(&dir, src, &["--64"]);
    let r = &log["object_report"];
    assert_eq!((r["sites"]["sti"].as_u64(), r["sites"]["cli"].as_u64()), (Some(1), Some(1)), "{log}");
    assert_eq!((r["found"].as_u64(), r["covered"].as_u64()), (Some(2), Some(2)), "{log}");
}

/// Every sensitive form the text table knows, in one file, through our `as`: every sensitive
/// instruction the rewriter's scan finds is covered, and each record carries exactly the
/// fields the rewriter's `record::operands` derives from the assembled instruction.
#[test]
fn every_sensitive_form_is_covered_with_the_right_operands() {
    let dir = scratch("every");
    let body = "cli\nsti\npushf\npushfw\npopfq\niretq\niretl\nmov %cr3,%rax\nmov %rdi,%cr4\nmov %cr8,%r9\nmov %dr7,%rcx\nmov %rax,%dr0\nmovw %ax,%ds\nmov %ss,%eax\nmov %es,8(%rsp)\nclts\nlmsw %ax\nsmsw %eax\npush %fs\npushw %gs\npop %fs\nlgdt (%rax)\nlidt 16(%rbx,%rcx,4)\nlldt %ax\nltr %di\nsgdt gdt(%rip)\nsidt (%rsp)\nsldt %eax\nstr %eax\nlar %cx,%eax\nlsl %ax,%rdx\nverr %ax\nverw (%rax)\nlcall *(%rax)\nljmpl *8(%rdi)\nlret\nlretq $16\ninvlpg (%rdi)\ninvpcid (%rsi),%rdi\ninvd\nwbinvd\ninb $0x60,%al\ninw %dx,%ax\ninl $0x71,%eax\noutb %al,$0x80\noutw %ax,%dx\noutl %eax,%dx\ninsb\nrep insw\noutsl\nrep outsb\nrdmsr\nwrmsr\ncpuid\nrdpmc\nxsetbv\nrdfsbase %rax\nrdgsbase %r12\nwrfsbase %rdi\nwrgsbase %eax\nswapgs\nhlt\nsysretq\nsysretl\nsysexit\nint $0x80\nmonitor\nmwait\nvmcall\nvmmcall\n.intel_syntax noprefix\nmov cr0, rbx\nout dx, al\n.att_syntax\n";
    let src = format!("\t.text\ngdt:\n{body}\t.pushsection .altinstr_replacement,\"ax\"\n\tsti\n\t.popsection\n\t.section .init.text,\"ax\",@progbits\n\tcli\n");
    let (obj, log) = assemble(&dir, &src, &["--64"]);
    let elf = Elf::parse(&obj).unwrap();
    let table = sites::read(&elf).unwrap().expect("site table");
    let hits = scan_elf(&elf);
    let cov = sites::coverage(&hits, &table);
    let statements = body.lines().filter(|l| !l.starts_with('.')).count() + 2;
    assert_eq!(hits.len(), statements, "one hit per statement");
    assert_eq!(cov.covered, hits.len(), "uncovered: {:?}", cov.uncovered);
    assert_eq!(table.sites.len(), hits.len());
    assert_eq!(log["object_report"]["uncovered"].as_array().unwrap().len(), 0);
    for h in &hits {
        let site = table.sites.iter().find(|s| s.site.section_offset() == Some((h.section, h.offset))).unwrap();
        let sec = &elf.sections[h.section].name;
        let want = h.record(sec);
        let got = site.record;
        let what = format!("{} at {sec}+{:#x}", h.att(), h.offset);
        assert_eq!(
            (got.kind, got.flags, got.width, got.reg, got.base, got.index, got.scale, got.imm),
            (want.kind, want.flags, want.width, want.reg, want.base, want.index, want.scale, want.imm),
            "{what}"
        );
        assert_eq!(usize::from(got.insn_len), h.len(), "{what}");
        assert_eq!(got.site_len, h.entry.site_len(h.len()), "{what}");
        // The scratch bytes are NOPs that decode as such.
        let code =
            &elf.sections[h.section].data[h.offset as usize + h.len()..h.offset as usize + got.site_len as usize];
        let nops = previrt_rewriter::iced_x86::Decoder::with_ip(64, code, 0, Default::default());
        assert!(nops.into_iter().all(|i| i.mnemonic() == previrt_rewriter::iced_x86::Mnemonic::Nop), "{what}");
        assert_eq!(site.resume.section_offset(), Some((h.section, h.offset + got.site_len as u64)), "{what}");
        assert_eq!(site.origin.section_offset(), Some((h.section, h.offset)), "{what}");
        let (save_sec, _) = site.save.section_offset().unwrap();
        assert_eq!(elf.sections[save_sec].name, previrt_site_abi::SAVE_SECTION);
        if sec == ".altinstr_replacement" {
            assert!(got.flags & flags::IN_ALTINSTR != 0);
        }
        if sec == ".init.text" {
            assert!(got.flags & flags::INIT != 0);
        }
    }
    // Spot checks of operand encodings, independent of the rewriter's own function.
    let rec = |asm: &str| {
        let h = hits.iter().find(|h| h.att().starts_with(asm)).unwrap_or_else(|| panic!("no {asm}"));
        table.sites.iter().find(|s| s.site.section_offset() == Some((h.section, h.offset))).unwrap().record
    };
    let out = rec("out %al,$0x80");
    assert_eq!(
        (out.imm, out.width, out.flags & (flags::IMM_PORT | flags::WRITE)),
        (0x80, 1, flags::IMM_PORT | flags::WRITE)
    );
    let cr4 = rec("mov %rdi,%cr4");
    assert_eq!(
        (cr4.reg, cr4.base, cr4.flags & flags::WRITE),
        (previrt_site_abi::reg::gpr(7), previrt_site_abi::reg::cr(4), flags::WRITE)
    );
    assert_eq!(rec("int $0x80").imm, 0x80);
    assert_eq!(rec("rep insw").flags & flags::REP, flags::REP);
    // The save section holds one insn_len slot per site.
    let save = elf.section_by_name(previrt_site_abi::SAVE_SECTION).unwrap();
    assert_eq!(save.size, table.sites.iter().map(|s| s.record.insn_len as u64).sum::<u64>());
}

#[test]
fn byte_encoded_instructions_are_sites_or_reported_uncovered() {
    let dir = scratch("bytes");
    // One literal `.byte` statement spelling one sensitive instruction (Linux's `monitor`)
    // becomes a site; a cli hidden in a two-instruction `.byte` run cannot and is reported.
    let src = "\t.text\nf:\n\tcli\n\t.byte 0xfa, 0x90\n\t.byte 0x0f, 0x01, 0xc8\n\tret\n";
    let (_, log) = assemble(&dir, src, &["--64"]);
    let r = &log["object_report"];
    assert_eq!((r["found"].as_u64(), r["covered"].as_u64()), (Some(3), Some(2)));
    assert_eq!(r["sites"]["monitor"], 1);
    let unc = r["uncovered"].as_array().unwrap();
    assert_eq!(unc.len(), 1, "{unc:?}");
    assert_eq!(unc[0]["kind"], "cli");
    assert_eq!(unc[0]["reason"], "no_site");
    assert_eq!(unc[0]["offset"], 5, "after the 5-byte site of the real cli");
    assert_eq!(unc[0]["function"], "f+0x5");
    // Verbose mode says the same on standard error; the build still succeeds.
    let out = run(Command::new(our_as())
        .args(["--64", "-o"])
        .arg(dir.join("t.o"))
        .arg(dir.join("t.s"))
        .env("PREVIRT_VERBOSE", "1"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("uncovered cli at .text+0x5"));
}

#[test]
fn unknown_syntax_passes_through_unchanged() {
    let dir = scratch("unknown");
    // Nothing sensitive, odd constructs: the object must equal the system assembler's.
    let src = "\t.text\n\t.ascii \"a\\\"b;cli\"\n\t.byte '\\n, ';\n\t# \u{00e9}\u{00ff} not utf-8 below\n\tnop\n\t.string \"unterminated-looking \\\\\"\n\tx = 3 ; y = x + 1\n\tmovl $y, %eax\n";
    let mut bytes = src.as_bytes().to_vec();
    bytes.extend_from_slice(b"\t# \xff\xfe raw bytes\n");
    std::fs::write(dir.join("t.s"), &bytes).unwrap();
    for (asm, obj) in [(our_as(), "ours.o"), (PathBuf::from("/usr/bin/as"), "plain.o")] {
        let out = run(Command::new(asm).args(["--64", "-o"]).arg(dir.join(obj)).arg(dir.join("t.s")));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(std::fs::read(dir.join("ours.o")).unwrap(), std::fs::read(dir.join("plain.o")).unwrap());
    // A line the lexer cannot parse (unterminated string) is passed through and reported.
    let (_, stats) = rewrite("\tcli\n\t.ascii \"open\n\tsti\n");
    assert_eq!(stats.unparsed.len(), 1);
    assert_eq!(stats.unparsed[0].line, 2);
}

#[test]
fn assembler_errors_come_through_with_status_and_message() {
    let dir = scratch("error");
    let s = dir.join("bad.s");
    std::fs::write(&s, "\tcli\n\tbogus_insn %eax\n\tsti\n").unwrap();
    let ours = run(Command::new(our_as()).args(["--64", "-o"]).arg(dir.join("a.o")).arg(&s));
    let plain = run(Command::new("/usr/bin/as").args(["--64", "-o"]).arg(dir.join("b.o")).arg(&s));
    assert_eq!(ours.status.code(), plain.status.code());
    assert_ne!(ours.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&ours.stderr), String::from_utf8_lossy(&plain.stderr));
    assert!(String::from_utf8_lossy(&ours.stderr).contains("bad.s:2: Error: no such instruction"));
}

#[test]
fn standard_input_is_rewritten_too() {
    let dir = scratch("stdin");
    let o = dir.join("t.o");
    let mut child =
        Command::new(our_as()).args(["--64", "-o"]).arg(&o).stdin(std::process::Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"\tcli\n\tnop\n").unwrap();
    assert!(child.wait().unwrap().success());
    let data = std::fs::read(&o).unwrap();
    let (_, cov) = sites::check_object(&data).unwrap().expect("site table");
    assert_eq!((cov.total, cov.covered), (1, 1));
}

fn decoded_lines(obj: &Path) -> Vec<String> {
    let out = run(Command::new("objdump").arg("--dwarf=decodedline").arg(obj));
    // (file, line) per row; addresses differ by the padding.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2].starts_with("0x") || f.len() >= 3 && f[2] == "0")
                .then(|| format!("{} {}", f[0], f[1]))
        })
        .collect()
}

#[test]
fn debug_line_info_points_at_the_same_source_lines() {
    let dir = scratch("debug");
    std::fs::write(
        dir.join("e.S"),
        "#define IRQ_OFF cli\n\t.text\n\t.globl f\nf:\n\tnop\n\tIRQ_OFF\n\tsti ; nop\n\tmov %cr3, %rax\n\tret\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("c.c"),
        "int g;\nint f(int x) {\n  unsigned long fl;\n  asm volatile(\"pushf ; pop %0\" : \"=r\"(fl));\n  asm volatile(\"cli\");\n  g = x * 3;\n  return g + (int)fl;\n}\n",
    )
    .unwrap();
    std::fs::write(dir.join("s.s"), "\t.text\n\tnop\n\tcli\n\tnop\n\thlt\n").unwrap();
    for (src, gflag) in [("e.S", "-g"), ("c.c", "-g"), ("s.s", "-Wa,-g")] {
        let plain = dir.join(format!("{src}.plain.o"));
        let ours = dir.join(format!("{src}.ours.o"));
        let o1 = run(Command::new("gcc").args(["-O2", gflag, "-c"]).arg(dir.join(src)).arg("-o").arg(&plain));
        assert!(o1.status.success(), "{}", String::from_utf8_lossy(&o1.stderr));
        let o2 = run(Command::new(tool("gcc")).args(["-O2", gflag, "-c"]).arg(dir.join(src)).arg("-o").arg(&ours));
        assert!(o2.status.success(), "{}", String::from_utf8_lossy(&o2.stderr));
        let (a, b) = (decoded_lines(&plain), decoded_lines(&ours));
        assert!(a.len() > 3, "{src}: no line table: {a:?}");
        assert_eq!(a, b, "{src}: line table rows differ");
        let (_, cov) = sites::check_object(&std::fs::read(&ours).unwrap()).unwrap().expect("sites");
        assert_eq!(cov.covered, cov.total, "{src}");
    }
}

#[test]
fn gcc_wrapper_reaches_our_as_and_leaves_plain_objects_identical() {
    let dir = scratch("gcc");
    std::fs::write(dir.join("plain.c"), "int h;\nint f(int x) { for (int i = 0; i < x; i++) h += i * x; return h; }\n")
        .unwrap();
    std::fs::write(dir.join("irq.c"), "void f(void) { asm volatile(\"cli\"); asm volatile(\"sti\"); }\n").unwrap();
    for src in ["plain.c", "irq.c"] {
        let a = dir.join(format!("{src}.gcc.o"));
        let b = dir.join(format!("{src}.ours.o"));
        assert!(run(Command::new("gcc").args(["-O2", "-c"]).arg(dir.join(src)).arg("-o").arg(&a)).status.success());
        let o = run(Command::new(tool("gcc")).args(["-O2", "-c"]).arg(dir.join(src)).arg("-o").arg(&b));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        if src == "plain.c" {
            assert_eq!(a, b, "an object without sensitive instructions must be byte-identical");
        } else {
            let (_, cov) = sites::check_object(&b).unwrap().expect("site table from the gcc wrapper");
            assert_eq!((cov.total, cov.covered), (2, 2));
        }
    }
}

#[test]
fn tool_names_dispatch_and_pass_through() {
    assert_eq!(tool_for("/p/bin/x86_64-previrt-linux-gnu-gcc"), Some(Tool::Compiler("gcc")));
    assert_eq!(tool_for("x86_64-previrt-linux-gnu-gcc-ar"), Some(Tool::System("gcc-ar")));
    assert_eq!(tool_for("x86_64-previrt-linux-gnu-ar"), Some(Tool::System("ar")));
    assert_eq!(tool_for("/p/libexec/previrt/as"), Some(Tool::As));
    assert_eq!(tool_for("x86_64-previrt-linux-gnu-ld.bfd"), Some(Tool::System("ld.bfd")));
    assert_eq!(tool_for("previrt"), None);
    assert_eq!(tool_for("/usr/bin/previrt"), None);
    for t in previrt_toolchain::TOOLS.iter().map(|(n, _)| n) {
        assert!(tool(t).exists(), "{t} not installed");
    }
    let ours = run(Command::new(tool("objdump")).arg("--version"));
    let sys = run(Command::new("objdump").arg("--version"));
    assert!(ours.status.success());
    assert_eq!(ours.stdout, sys.stdout, "objdump passes through");
    let v = run(Command::new(tool("gcc")).arg("-dumpversion"));
    assert_eq!(v.stdout, run(Command::new("gcc").arg("-dumpversion")).stdout);
    // The gcc wrapper hands gcc our `as` directory.
    let p = run(Command::new(tool("gcc")).arg("-print-prog-name=as"));
    assert_eq!(String::from_utf8_lossy(&p.stdout).trim(), our_as().to_string_lossy());
}

//! The example kernel (examples/kernel) under QEMU TCG: every workload passes with stable
//! checksums through both 32-bit boot paths, the command line works, exceptions fail the
//! run, and the image has the layout and the sensitive instructions the other parts rely on.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::process::Command;

const WORKLOADS: [&str; 7] = ["pagetable", "irqflag", "timer", "cpuid_msr", "mmio", "console", "compute"];

fn tool_output(tool: &str, args: &[&str]) -> String {
    require_tool(tool);
    let o = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(o.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a default run passed every workload once; returns name -> checksum.
fn assert_all_pass(run: &QemuRun, boot: &str) -> BTreeMap<String, String> {
    let ctx = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert_eq!(run.status, 0, "run-qemu.sh should report PASS; {ctx}");
    assert!(run.stdout.starts_with(&format!("kernel: boot={boot} ")), "{ctx}");
    assert_eq!(run.stdout.lines().last(), Some("RESULT PASS"), "{ctx}");
    let lines = workload_lines(&run.stdout);
    let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, WORKLOADS, "{ctx}");
    for (i, l) in lines.iter().enumerate() {
        assert!(l.pass, "{} failed; {ctx}", l.name);
        assert_eq!(l.seq, i as u64 + 1, "{ctx}");
        let sum = l.checksum.as_deref().unwrap_or_default();
        assert!(sum.len() == 16 && sum.bytes().all(|b| b.is_ascii_hexdigit()), "bad checksum {sum:?}; {ctx}");
    }
    lines.into_iter().map(|l| (l.name, l.checksum.unwrap())).collect()
}

#[test]
fn both_boot_paths_pass_every_workload_with_identical_checksums() {
    let k = example_kernel();
    let runs = [
        (run_qemu(&k.elf(), ""), "multiboot"),
        (run_qemu(&k.elf(), ""), "multiboot"),
        (run_qemu(&k.pvh_elf(), ""), "pvh"),
    ];
    let sums: Vec<_> = runs.iter().map(|(run, boot)| assert_all_pass(run, boot)).collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "checksums differ between boots: {sums:#?}");
    let lines: Vec<_> = runs.iter().map(|(run, _)| deterministic_lines(&run.stdout)).collect();
    assert!(lines.windows(2).all(|w| w[0] == w[1]), "outputs differ between boots: {lines:#?}");
    assert_eq!(lines[0].iter().filter(|l| l.starts_with("CONSOLE ")).count(), 64);
    // PVH passes exactly the command line; multiboot (QEMU) prefixes the kernel's file name.
    assert!(runs[2].0.stdout.starts_with("kernel: boot=pvh cmdline=\"\"\n"), "{}", runs[2].0.stdout);
}

#[test]
fn command_line_selects_workloads_repeat_and_sizes() {
    let k = example_kernel();
    let run = run_qemu(&k.pvh_elf(), "workloads=compute,console repeat=3 compute=5000 console_lines=5");
    assert_eq!(run.status, 0, "{}", run.stdout);
    let lines = workload_lines(&run.stdout);
    let got: Vec<(&str, u64)> = lines.iter().map(|l| (l.name.as_str(), l.seq)).collect();
    assert_eq!(
        got,
        [("compute", 1), ("console", 2), ("compute", 3), ("console", 4), ("compute", 5), ("console", 6)],
        "{}",
        run.stdout
    );
    assert!(lines.iter().all(|l| l.pass), "{}", run.stdout);
    for name in ["compute", "console"] {
        let sums: Vec<_> = lines.iter().filter(|l| l.name == name).map(|l| l.checksum.clone()).collect();
        assert!(sums.windows(2).all(|w| w[0] == w[1]), "{name} checksum changed between rounds: {sums:?}");
    }
    let console: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("CONSOLE ")).collect();
    assert_eq!(console.len(), 15, "{}", run.stdout);
    assert!(console[..5].iter().enumerate().all(|(i, l)| l.starts_with(&format!("CONSOLE {i:04} "))));

    // The iteration count reaches the compute workload: a different count, a different checksum.
    let default = run_qemu(&k.pvh_elf(), "workloads=compute");
    assert_eq!(default.status, 0, "{}", default.stdout);
    assert_ne!(workload_lines(&default.stdout)[0].checksum, lines[0].checksum);
}

#[test]
fn compute_checksum_matches_the_same_loop_built_for_the_host() {
    let k = example_kernel();
    let run = run_qemu(&k.elf(), "workloads=compute compute=123457");
    assert_eq!(run.status, 0, "{}", run.stdout);
    let host = tool_output(k.compute_host().to_str().unwrap(), &["123457"]);
    let host_line = host.lines().next().unwrap();
    let kernel_line = run.stdout.lines().find(|l| l.starts_with("WORKLOAD compute ")).unwrap();
    assert_eq!(kernel_line, format!("{host_line} seq=1"));
}

#[test]
fn exception_reports_vector_error_and_rip_then_fails() {
    let k = example_kernel();
    let run = run_qemu(&k.elf(), "workloads=fault");
    assert_eq!(run.status, 1, "run-qemu.sh should report FAIL; {}", run.stdout);
    let line = run.stdout.lines().find(|l| l.starts_with("EXCEPTION ")).expect("an EXCEPTION line");
    assert!(line.starts_with("EXCEPTION vector=14 (#PF) error=0x0 rip=0x"), "{line}");
    assert!(line.ends_with(" cr2=0x10000000000"), "{line}");
    assert_eq!(run.stdout.lines().last(), Some("RESULT FAIL"));

    // The reported RIP lies inside the function that faulted.
    let rip = u64::from_str_radix(line.split("rip=0x").nth(1).unwrap().split(' ').next().unwrap(), 16).unwrap();
    let nm = tool_output("nm", &["-S", k.elf().to_str().unwrap()]);
    let (start, size) = nm
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == "wl_fault")
                .then(|| (u64::from_str_radix(f[0], 16).unwrap(), u64::from_str_radix(f[1], 16).unwrap()))
        })
        .expect("wl_fault in the symbol table");
    assert!((start..start + size).contains(&rip), "rip {rip:#x} outside wl_fault {start:#x}+{size:#x}");
}

#[test]
fn bad_command_line_fails_before_any_workload() {
    let k = example_kernel();
    let run = run_qemu(&k.elf(), "workloads=compute,bogus repeat=x hz=0");
    assert_eq!(run.status, 1, "{}", run.stdout);
    assert!(run.stdout.contains("ERROR bad number in \"repeat=x\"\n"), "{}", run.stdout);
    assert!(run.stdout.contains("ERROR unknown workload \"bogus\"\n"), "{}", run.stdout);
    assert!(run.stdout.contains("ERROR hz must be positive\n"), "{}", run.stdout);
    assert!(workload_lines(&run.stdout).is_empty(), "{}", run.stdout);
    assert_eq!(run.stdout.lines().last(), Some("RESULT FAIL"));
}

#[test]
fn run_qemu_reports_a_kernel_that_never_finishes_as_a_timeout() {
    let k = example_kernel();
    let run = run_qemu_with_env(&k.elf(), "workloads=timer ticks=100000000", &[("TIMEOUT", "3")]);
    assert_eq!(run.status, 124, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("no verdict within 3s"), "{}", run.stderr);
}

/// Lines of `objdump -d` for one section, instruction text only (mnemonic and operands).
fn disassembly(elf: &str, section: &str, arch: &str) -> Vec<String> {
    tool_output("objdump", &["-d", "--no-show-raw-insn", "-M", "att", "-m", arch, "-j", section, elf])
        .lines()
        .filter_map(|l| l.split_once(":\t").map(|(_, insn)| insn.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

#[test]
fn kernel_uses_every_sensitive_instruction_family() {
    let elf = example_kernel().elf();
    let elf = elf.to_str().unwrap();
    let text = disassembly(elf, ".text", "i386:x86-64");
    // (family, instruction text starts with, ends with)
    let families = [
        ("cli", "cli", ""),
        ("sti", "sti", ""),
        ("pushf", "pushf", ""),
        ("popf", "popf", ""),
        ("hlt", "hlt", ""),
        ("in", "in ", ",%al"),
        ("out", "out %al,", ""),
        ("cpuid", "cpuid", ""),
        ("rdmsr", "rdmsr", ""),
        ("wrmsr", "wrmsr", ""),
        ("invlpg", "invlpg ", ""),
        ("mov to cr0", "mov %", ",%cr0"),
        ("mov to cr3", "mov %", ",%cr3"),
        ("mov to cr4", "mov %", ",%cr4"),
        ("mov from cr2", "mov %cr2,", ""),
        ("mov from cr3", "mov %cr3,", ""),
        ("lgdt", "lgdt ", ""),
        ("lidt", "lidt ", ""),
        ("ltr", "ltr ", ""),
        ("mov to ds", "mov %", ",%ds"),
        ("mov to ss", "mov %", ",%ss"),
        ("far return", "lretq", ""),
        ("iretq", "iretq", ""),
    ];
    let missing: Vec<&str> = families
        .iter()
        .filter(|(_, start, end)| !text.iter().any(|i| i.starts_with(start) && i.ends_with(end)))
        .map(|(name, _, _)| *name)
        .collect();
    assert!(missing.is_empty(), "no {missing:?} in .text");

    // The trampoline decodes as 32-bit code doing the long-mode switch.
    let head32 = disassembly(elf, ".head32.text", "i386");
    for want in ["ljmp $0x8,", "ljmp $0x10,", "mov %eax,%cr3", "mov %eax,%cr0", "wrmsr", "lgdtl "] {
        assert!(head32.iter().any(|i| i.starts_with(want)), "no `{want}` in .head32.text: {head32:#?}");
    }
}

fn multiboot_header_offset(image: &[u8]) -> Option<usize> {
    let word = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap());
    (0..image.len().min(8192) - 12)
        .step_by(4)
        .find(|&o| word(o) == 0x1bad_b002 && word(o).wrapping_add(word(o + 4)).wrapping_add(word(o + 8)) == 0)
}

#[test]
fn image_layout_suits_every_loader() {
    let k = example_kernel();
    let elf = k.elf();
    let elf_s = elf.to_str().unwrap();

    // One PT_LOAD, vaddr = paddr, at or above 1 MiB; a PT_NOTE.
    let phdrs = tool_output("readelf", &["-lW", elf_s]);
    let loads: Vec<Vec<&str>> = phdrs
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.first() == Some(&"LOAD"))
        .collect();
    assert_eq!(loads.len(), 1, "{phdrs}");
    let (vaddr, paddr) = (u64::from_str_radix(&loads[0][2][2..], 16).unwrap(), &loads[0][3]);
    assert_eq!(&loads[0][2], paddr, "vaddr != paddr: {phdrs}");
    assert!(vaddr >= 0x100000, "{phdrs}");
    assert!(phdrs.lines().any(|l| l.trim_start().starts_with("NOTE")), "{phdrs}");

    // ELF entry = kernel_entry64; the PVH note points at pvh_start32.
    let syms = tool_output("nm", &[elf_s]);
    let addr = |name: &str| {
        syms.lines()
            .find_map(|l| l.ends_with(&format!(" {name}")).then(|| u64::from_str_radix(&l[..16], 16).unwrap()))
            .unwrap_or_else(|| panic!("no symbol {name}"))
    };
    let header = tool_output("readelf", &["-hW", elf_s]);
    let entry = header.lines().find_map(|l| l.trim().strip_prefix("Entry point address:")).map(str::trim);
    assert_eq!(entry, Some(format!("{:#x}", addr("kernel_entry64")).as_str()), "{header}");
    let notes = tool_output("readelf", &["-nW", elf_s]);
    let pvh = addr("pvh_start32").to_le_bytes().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    assert!(notes.contains("(0x00000012)") && notes.contains(&pvh), "no PVH note for {pvh}: {notes}");

    // A valid multiboot header in the first 8 KiB of kernel.elf, none in kernel-pvh.elf.
    assert!(multiboot_header_offset(&std::fs::read(&elf).unwrap()).is_some());
    assert!(multiboot_header_offset(&std::fs::read(k.pvh_elf()).unwrap()).is_none());
}

//! Helpers for the VMM tests: assemble tiny guests with the system `as`/`ld`, run them under
//! `previrt run`. Missing prerequisites fail the test with a pointer to scripts/install-deps.sh.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// /dev/kvm must exist and be openable; otherwise the test fails loudly.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("/dev/kvm is not accessible ({e}): these tests need KVM; see scripts/install-deps.sh");
    }
}

fn tool(cmd: &mut Command, what: &str) {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("cannot run {what} ({e}); run scripts/install-deps.sh (binutils)"));
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Assemble `src` (GNU as, 64-bit object) and link it at 1 MiB with entry `entry`.
pub fn guest(dir: &Path, name: &str, src: &str, entry: &str) -> PathBuf {
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    let elf = dir.join(name);
    std::fs::write(&s, src).unwrap();
    tool(Command::new("as").arg("--64").arg("-o").arg(&o).arg(&s), "as");
    tool(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-z", "max-page-size=4096", "-Ttext=0x100000", "-e", entry, "-o"])
            .arg(&elf)
            .arg(&o),
        "ld",
    );
    elf
}

/// A 32-bit PVH guest: the PVH note and the `pvh_start` entry label come first, `body` is the
/// code at the entry (%ebx = hvm_start_info) and whatever follows it.
pub fn pvh_guest(dir: &Path, name: &str, body: &str) -> PathBuf {
    let src = format!(
        r#".section .note.pvh, "a"
.balign 4
.long 4, 4, 18
.asciz "Xen"
.long pvh_start
.text
.code32
.globl pvh_start
pvh_start:
{body}"#
    );
    guest(dir, name, &src, "pvh_start")
}

/// `previrt run KERNEL ARGS...`.
pub fn run(kernel: &Path, args: &[&str]) -> Output {
    require_kvm();
    Command::new(env!("CARGO_BIN_EXE_previrt")).arg("run").arg(kernel).args(args).output().expect("spawn previrt")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Guest code printing the NUL-terminated string at %rsi over COM1 (clobbers rax, rdx, rsi).
pub const PUTS64: &str = r#"
puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
"#;

/// Guest code: exit through isa-debug-exit with the value in %eax.
pub const EXIT64: &str = r#"
exit:
    mov $0xf4, %dx
    out %eax, %dx
    hlt
"#;

//! Helpers shared by integration tests: the example kernel, built once per test process, and
//! QEMU runs of it. Every missing prerequisite is a failure naming `scripts/install-deps.sh`.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn kernel_src() -> PathBuf {
    repo_root().join("examples/kernel")
}

/// Fails the test unless `tool` is on PATH.
pub fn require_tool(tool: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "`{tool}` not found on PATH; run scripts/install-deps.sh");
}

/// The report of scripts/linux-build.sh --json: Linux 6.1 tinyconfig built with plain gcc and
/// with the previrt toolchain and booted (cached under ~/.cache/previrt, rebuilt when missing
/// or when the toolchain changed).
pub fn linux_build_report() -> serde_json::Value {
    let o = Command::new("bash")
        .arg(repo_root().join("scripts/linux-build.sh"))
        .arg("--json")
        .env("PREVIRT_BIN", env!("CARGO_BIN_EXE_previrt"))
        .output()
        .expect("running scripts/linux-build.sh");
    assert!(
        o.status.success(),
        "scripts/linux-build.sh failed (prerequisites come from scripts/install-deps.sh):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("report JSON on stdout")
}

/// Debian's 6.1 kernel cache (`vmlinux`, `modules/`), fetched once by scripts/debian-kernel.sh.
pub fn debian_kernel() -> PathBuf {
    let o = Command::new("bash")
        .arg(repo_root().join("scripts/debian-kernel.sh"))
        .output()
        .expect("running scripts/debian-kernel.sh");
    assert!(
        o.status.success(),
        "scripts/debian-kernel.sh failed (needs network once; see scripts/install-deps.sh): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(dir.join("vmlinux").is_file(), "{}: no vmlinux; run scripts/debian-kernel.sh", dir.display());
    dir
}

/// The outputs of one `make` of the example kernel.
pub struct KernelBuild {
    pub dir: PathBuf,
}

impl KernelBuild {
    /// Multiboot header and PVH note; QEMU boots it through multiboot.
    pub fn elf(&self) -> PathBuf {
        self.dir.join("kernel.elf")
    }
    /// The same objects without the multiboot header, so QEMU boots it through PVH.
    pub fn pvh_elf(&self) -> PathBuf {
        self.dir.join("kernel-pvh.elf")
    }
    /// The compute workload's loop as a host program: `compute-host [ITERATIONS]`.
    pub fn compute_host(&self) -> PathBuf {
        self.dir.join("compute-host")
    }
}

/// Builds the example kernel into `out` with `make O=out [CROSS_COMPILE=prefix]`.
pub fn build_example_kernel(out: &Path, cross_compile: Option<&str>) -> KernelBuild {
    build_example_kernel_with(out, cross_compile, &[])
}

/// As [`build_example_kernel`], with more `make` variables (`vars`, e.g. `KCFLAGS=…`).
pub fn build_example_kernel_with(out: &Path, cross_compile: Option<&str>, vars: &[&str]) -> KernelBuild {
    require_tool("make");
    let mut make = Command::new("make");
    make.arg("-s").arg("-C").arg(kernel_src()).arg(format!("O={}", out.display())).args(vars);
    if let Some(prefix) = cross_compile {
        make.arg(format!("CROSS_COMPILE={prefix}"));
    }
    let o = make.output().expect("running make");
    assert!(
        o.status.success(),
        "building the example kernel failed ({}); is gcc installed (scripts/install-deps.sh)?\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    KernelBuild { dir: out.to_path_buf() }
}

/// The example kernel built with the host gcc/ld, once per test process, in a directory of
/// its own under cargo's target tmp dir (directories of processes that are gone are removed).
pub fn example_kernel() -> &'static KernelBuild {
    static BUILD: OnceLock<KernelBuild> = OnceLock::new();
    BUILD.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_dirs_of_dead_processes(base, "example-kernel-");
        let dir = base.join(format!("example-kernel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        build_example_kernel(&dir, None)
    })
}

fn remove_dirs_of_dead_processes(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A finished `examples/kernel/run-qemu.sh` run.
pub struct QemuRun {
    /// run-qemu.sh's status: 0 PASS, 1 FAIL, 3 no verdict, 124 timeout.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Boots `kernel` under QEMU TCG with `cmdline` through `examples/kernel/run-qemu.sh`.
pub fn run_qemu(kernel: &Path, cmdline: &str) -> QemuRun {
    run_qemu_with_env(kernel, cmdline, &[])
}

pub fn run_qemu_with_env(kernel: &Path, cmdline: &str, env: &[(&str, &str)]) -> QemuRun {
    // run-qemu.sh runs $QEMU when set.
    require_tool(&std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()));
    let o = Command::new(kernel_src().join("run-qemu.sh"))
        .arg(kernel)
        .arg(cmdline)
        .envs(env.iter().copied())
        .output()
        .expect("running run-qemu.sh");
    QemuRun {
        status: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// One `WORKLOAD` line of the kernel's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadLine {
    pub name: String,
    pub pass: bool,
    /// 16 hex digits on PASS lines, None on FAIL lines.
    pub checksum: Option<String>,
    pub seq: u64,
}

pub fn workload_lines(output: &str) -> Vec<WorkloadLine> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("WORKLOAD "))
        .map(|rest| {
            let mut words = rest.split(' ');
            let name = words.next().unwrap_or_default().to_string();
            let pass = words.next() == Some("PASS");
            let mut checksum = None;
            let mut seq = None;
            for w in words {
                if let Some(c) = w.strip_prefix("checksum=") {
                    checksum = Some(c.to_string());
                } else if let Some(s) = w.strip_prefix("seq=") {
                    seq = s.parse().ok();
                }
            }
            WorkloadLine { name, pass, checksum, seq: seq.unwrap_or_else(|| panic!("no seq= in `WORKLOAD {rest}`")) }
        })
        .collect()
}

/// The output lines that must be identical for one command line on every platform and
/// backend: all but the boot banner and the TIMING lines.
pub fn deterministic_lines(output: &str) -> Vec<&str> {
    output.lines().filter(|l| !l.starts_with("kernel: ") && !l.starts_with("TIMING ")).collect()
}

/// tests/runtime_fixtures/NAME.S assembled with the previrt toolchain (its sensitive
/// instructions become sites), linked with regdump.ld and `previrt link`ed with the runtime,
/// under cargo's target tmp dir (one directory per fixture and test process).
pub fn linked_fixture(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("fixture-{name}-");
    remove_dirs_of_dead_processes(base, &prefix);
    let dir = base.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fixtures = repo_root().join("tests/runtime_fixtures");
    let run = |cmd: &mut Command, what: &str| {
        let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e} (run scripts/install-deps.sh)"));
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{what} failed: {out}");
    };
    require_tool("ld");
    let previrt = || Command::new(env!("CARGO_BIN_EXE_previrt"));
    let tc = dir.join("toolchain");
    run(previrt().args(["toolchain", "install", "--prefix"]).arg(&tc), "previrt toolchain install");
    let (obj, elf, linked) = (dir.join("f.o"), dir.join("f.elf"), dir.join("f-linked.elf"));
    run(
        Command::new(tc.join("bin/x86_64-previrt-linux-gnu-gcc"))
            .arg("-c")
            .arg(fixtures.join(format!("{name}.S")))
            .arg("-o")
            .arg(&obj),
        "assembling the fixture with the previrt toolchain",
    );
    run(
        Command::new("ld")
            .arg("-T")
            .arg(fixtures.join("regdump.ld"))
            .args(["-z", "noexecstack", "--no-warn-rwx-segments", "-o"])
            .arg(&elf)
            .arg(&obj),
        "linking the fixture",
    );
    run(previrt().arg("link").arg(&elf).arg("-o").arg(&linked), "previrt link");
    linked
}

/// The example kernel built with the previrt toolchain (`previrt toolchain install`, then
/// `make CROSS_COMPILE=…`) and `previrt link`ed with the runtime (PVH entry), once per test
/// process, under cargo's target tmp dir.
pub fn linked_example_kernel() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_dirs_of_dead_processes(base, "linked-kernel-");
        let dir = base.join(format!("linked-kernel-{}", std::process::id()));
        link_example_kernel(&dir, &[])
    })
}

/// The example kernel built with the previrt toolchain and `make` variables `vars`, then
/// `previrt link`ed, in `dir` (emptied first); the linked ELF's path.
pub fn link_example_kernel(dir: &Path, vars: &[&str]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    let previrt = || Command::new(env!("CARGO_BIN_EXE_previrt"));
    let tc = dir.join("toolchain");
    let o = previrt().args(["toolchain", "install", "--prefix"]).arg(&tc).output().expect("previrt");
    assert!(o.status.success(), "previrt toolchain install: {}", String::from_utf8_lossy(&o.stderr));
    let prefix = format!("{}/bin/x86_64-previrt-linux-gnu-", tc.display());
    let build = build_example_kernel_with(&dir.join("kernel"), Some(&prefix), vars);
    let elf = dir.join("linked.elf");
    let o = previrt().arg("link").arg(build.pvh_elf()).arg("-o").arg(&elf).output().expect("previrt");
    assert!(o.status.success(), "previrt link: {}", String::from_utf8_lossy(&o.stderr));
    elf
}

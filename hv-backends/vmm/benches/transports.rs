//! Hypercall transports on this host, side by side: what one guest→VMM notification costs
//! through each mechanism the hypercall page could use.
//!
//!   cargo bench -p previrt-vmm --bench transports
//!
//! Each row runs a guest (assembled here with the system `as`) that performs the operation
//! N times in a loop; the cost per operation is (wall - empty loop) / N.

use std::path::Path;
use std::process::Command;

use previrt_hv_abi as abi;
use previrt_vmm::{AbiKind, Backend, RunArgs};

const N: u32 = 5000;

/// (name, loop body). The page setup in the prologue is common to every row.
const ROWS: [(&str, &str); 5] = [
    ("empty loop (baseline)", "nop"),
    ("hypercall stub (port I/O exit, VERSION)", "call hcpage"),
    ("doorbell port (ioeventfd, no exit)", "outb %al, $DOORBELL"),
    ("wrmsr to a user-space MSR", "mov $MSR_HC, %ecx\n    xor %eax, %eax\n    xor %edx, %edx\n    wrmsr"),
    ("cpuid (in-kernel exit)", "mov $0x40000000, %eax\n    cpuid"),
];

fn guest(dir: &Path, i: usize, body: &str) -> std::path::PathBuf {
    let src = format!(
        r#".equ MSR_HC, {msr:#x}
.equ DOORBELL, {db:#x}
.code64
.globl _start
_start:
    mov $MSR_HC, %ecx
    lea hcpage(%rip), %rax
    or $1, %rax
    xor %edx, %edx
    wrmsr
    mov ${n}, %r12d
1:  {body}
    dec %r12d
    jnz 1b
    mov $0, %eax
    mov $0xf4, %dx
    out %eax, %dx
.bss
.balign 4096
hcpage: .skip 4096
"#,
        msr = abi::MSR_HYPERCALL_PAGE,
        db = abi::CONSOLE_DOORBELL_PORT,
        n = N,
    );
    let s = dir.join(format!("t{i}.S"));
    let o = dir.join(format!("t{i}.o"));
    let elf = dir.join(format!("t{i}"));
    std::fs::write(&s, src).unwrap();
    assert!(Command::new("as").arg("--64").arg("-o").arg(&o).arg(&s).status().expect("as (binutils)").success());
    assert!(Command::new("ld")
        .args(["-m", "elf_x86_64", "-Ttext=0x100000", "-e", "_start", "-o"])
        .arg(&elf)
        .arg(&o)
        .status()
        .expect("ld")
        .success());
    elf
}

fn main() {
    let dir = std::env::temp_dir().join(format!("previrt-transports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // (µs per loop iteration, exits) per row.
    let runs: Vec<(f64, u64)> = ROWS
        .iter()
        .enumerate()
        .map(|(i, (_, body))| {
            let args = RunArgs {
                kernel: guest(&dir, i, body),
                mem: "16M".into(),
                append: String::new(),
                initrd: None,
                disk: None,
                boot: None,
                backend: Backend::Pv,
                abi: AbiKind::Previrt,
                domu: false,
                stats: false,
                stats_json: None,
                profile: None,
                profile_steps: None,
                profile_writes: false,
                snapshot: None,
                snapshot_after: None,
                control: None,
                suspend_timeout: 2000,
            };
            let r = previrt_vmm::run(&args, Box::new(std::io::sink())).expect("guest run");
            (r.stats.wall.as_secs_f64() * 1e6 / N as f64, r.stats.exits())
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let base = runs[0].0;
    // Ratios are relative to the port-I/O hypercall, the transport the stubs use today.
    let reference = (runs[1].0 - base).max(1e-9);
    println!("{:<42} {:>10} {:>8} {:>14}", "transport", "µs/op", "exits", "vs port I/O");
    for ((name, _), (per, exits)) in ROWS.iter().zip(&runs) {
        let cost = if *per == base { base } else { (per - base).max(0.0) };
        println!("{name:<42} {cost:>10.2} {exits:>8} {:>14.2}", cost / reference);
    }
}

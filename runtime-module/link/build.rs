//! Builds the guest runtime (runtime-module/, its own workspace) as a staticlib with the
//! kernel flags, takes its one LTO object, rewrites GOT-indirect references into direct ones,
//! then links it once at a sample address and checks the result by disassembly: the build
//! fails on any x87/MMX/SSE/AVX instruction or register, an undecodable byte, or a GOT.

#[path = "src/ld.rs"]
mod ld;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::LittleEndian as LE;
use previrt_rewriter::iced_x86::{Decoder, DecoderOptions, OpKind};
use std::path::{Path, PathBuf};
use std::process::Command;

const RUSTFLAGS: &[&str] = &[
    "-C",
    "target-feature=-sse,-sse2,-avx,-avx2",
    "-C",
    "no-redzone=yes",
    "-C",
    "code-model=kernel",
    "-C",
    "relocation-model=static",
];
/// The release profile for kernel code (set here: runtime-module is a non-root package of
/// the main workspace's point of view, where its own [profile] would be ignored).
const PROFILE: &[(&str, &str)] =
    &[("LTO", "fat"), ("PANIC", "abort"), ("CODEGEN_UNITS", "1"), ("OPT_LEVEL", "2"), ("DEBUG", "0")];
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let runtime = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for p in
        ["src", "Cargo.toml", "Cargo.lock", "../site-abi/src", "../site-abi/Cargo.toml", "../hv-backends/hv-abi/src"]
    {
        println!("cargo:rerun-if-changed={}", runtime.join(p).display());
    }
    println!("cargo:rerun-if-changed=src/runtime.ld");
    println!("cargo:rerun-if-changed=src/ld.rs");

    let archive = build_staticlib(&runtime, &out.join("runtime-target"));
    let mut object = runtime_member(&archive);
    rewrite_got(&mut object).unwrap_or_else(|e| panic!("runtime object: {e}"));
    let obj_path = out.join("previrt-runtime.o");
    std::fs::write(&obj_path, &object).unwrap();

    let sample = ld::Placement {
        base: 0x20_0000,
        sites_start: 0x10_0000,
        sites_end: 0x10_0000,
        kernel_pvh_entry: 0x10_0000,
        kernel_mb_entry: 0x10_0000,
        kernel_elf_entry: 0x10_0000,
        default_backend: 0,
        virt_delta: 0,
        text_resident: false,
        kernel_entry64: 0x10_0000,
    };
    let linked = out.join("previrt-runtime-check.elf");
    ld::link_runtime(&obj_path, &linked, &sample).unwrap_or_else(|e| panic!("check link of the runtime: {e}"));
    let problems = check(&std::fs::read(&linked).unwrap());
    if !problems.is_empty() {
        panic!("the linked runtime is not kernel-safe:\n  {}", problems.join("\n  "));
    }
}

/// `cargo rustc` on runtime-module with a separate target dir (nested cargo on the same one
/// deadlocks) and a clean environment (the outer build's flags must not leak in).
fn build_staticlib(runtime: &Path, target_dir: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (k, _) in std::env::vars() {
        let outer = (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTDOC")
            || matches!(
                k.as_str(),
                "RUSTFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if outer {
            cmd.env_remove(k);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\u{1f}"))
        .envs(PROFILE.iter().map(|(k, v)| (format!("CARGO_PROFILE_RELEASE_{k}"), v)))
        .args(["rustc", "--release", "--lib", "--features", "guest", "--crate-type", "staticlib", "--locked"])
        .args(["--target", TARGET, "--manifest-path"])
        .arg(runtime.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    let status = cmd.status().expect("run cargo for runtime-module");
    assert!(status.success(), "building runtime-module failed");
    target_dir.join(TARGET).join("release").join("libprevirt_runtime.a")
}

/// The crate's own object (fat LTO: one object holding the runtime and core). The archive's
/// compiler_builtins members are not used: they were built with SSE.
fn runtime_member(archive: &Path) -> Vec<u8> {
    let data = std::fs::read(archive).expect("read runtime archive");
    let ar = object::read::archive::ArchiveFile::parse(&*data).expect("parse runtime archive");
    let members: Vec<_> = ar
        .members()
        .map(|m| m.expect("archive member"))
        .filter(|m| String::from_utf8_lossy(m.name()).starts_with("previrt_runtime"))
        .collect();
    assert_eq!(members.len(), 1, "expected exactly one previrt_runtime object in {}", archive.display());
    members[0].data(&*data).expect("member data").to_vec()
}

/// Rewrite GOT-indirect references, which a kernel link rejects, the way ld relaxes
/// GOTPCRELX: `call *f@GOTPCREL` → `addr32 call f`, `jmp *f@GOTPCREL` → `nop; jmp f`,
/// `mov f@GOTPCREL(%rip), %r` → `lea f(%rip), %r`.
fn rewrite_got(obj: &mut [u8]) -> Result<(), String> {
    let hdr = elf::FileHeader64::<LE>::parse(&*obj).map_err(|e| e.to_string())?;
    let sections = hdr.sections(LE, &*obj).map_err(|e| e.to_string())?;
    let mut edits: Vec<(usize, &'static [u8], usize, elf::RelocationType)> = Vec::new();
    for s in sections.iter() {
        if s.sh_type(LE) != elf::SHT_RELA {
            continue;
        }
        let target = sections.section(object::SectionIndex(s.sh_info(LE) as usize)).map_err(|e| e.to_string())?;
        let (code, _) = target.file_range(LE).unwrap_or((0, 0));
        let relocs: &[elf::Rela64<LE>] = s.data_as_array(LE, &*obj).map_err(|e| e.to_string())?;
        let base = s.sh_offset(LE) as usize;
        for (i, r) in relocs.iter().enumerate() {
            let ty = r.r_type(LE, false);
            if !matches!(ty, elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX) {
                continue;
            }
            let at = code as usize + r.r_offset.get(LE) as usize;
            let info_at = base + i * std::mem::size_of::<elf::Rela64<LE>>() + 8;
            let (op, new, ty): (usize, &'static [u8], elf::RelocationType) = match &obj[at - 2..at] {
                [0xff, 0x15] => (at - 2, &[0x67, 0xe8], elf::R_X86_64_PLT32),
                [0xff, 0x25] => (at - 2, &[0x90, 0xe9], elf::R_X86_64_PLT32),
                [0x8b, m] if m & 0xc7 == 0x05 => (at - 2, &[0x8d], elf::R_X86_64_PC32),
                other => return Err(format!("GOT reference with unknown instruction bytes {other:02x?} at {at:#x}")),
            };
            edits.push((op, new, info_at, ty));
        }
    }
    for (op, new, info_at, ty) in edits {
        obj[op..op + new.len()].copy_from_slice(new);
        obj[info_at..info_at + 4].copy_from_slice(&ty.0.to_le_bytes());
    }
    Ok(())
}

/// Problems that make the linked runtime unsafe in a kernel, one line each.
fn check(linked: &[u8]) -> Vec<String> {
    let hdr = elf::FileHeader64::<LE>::parse(linked).expect("parse linked runtime");
    let sections = hdr.sections(LE, linked).expect("sections");
    let mut problems = Vec::new();
    for s in sections.iter() {
        let name = String::from_utf8_lossy(sections.section_name(LE, s).unwrap_or_default()).into_owned();
        if name.starts_with(".got") && s.sh_size(LE) != 0 {
            problems.push(format!("section {name} present: GOT references remain"));
        }
        let bitness = match name.as_str() {
            ".boot32" => 32,
            _ if s.sh_flags(LE).0 & elf::SHF_EXECINSTR.0 != 0 => 64,
            _ => continue,
        };
        let code = s.data(LE, linked).expect("section data");
        let mut dec = Decoder::with_ip(bitness, code, s.sh_addr(LE), DecoderOptions::NONE);
        for ins in &mut dec {
            let ip = ins.ip();
            if ins.is_invalid() {
                problems.push(format!("{name} {ip:#x}: undecodable bytes"));
                continue;
            }
            let bad_feature = ins.cpuid_features().iter().find(|f| {
                let f = format!("{f:?}");
                ["FPU", "MMX", "SSE", "SSSE", "AVX", "FMA", "F16C", "D3NOW", "XOP"].iter().any(|p| f.starts_with(p))
            });
            let bad_reg = (0..ins.op_count()).find_map(|i| {
                let r = ins.op_register(i);
                (ins.op_kind(i) == OpKind::Register
                    && (r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_mm() || r.is_st()))
                .then_some(r)
            });
            if let Some(f) = bad_feature {
                problems.push(format!("{name} {ip:#x}: {ins} needs {f:?}"));
            } else if let Some(r) = bad_reg {
                problems.push(format!("{name} {ip:#x}: {ins} uses {r:?}"));
            }
        }
    }
    let loads = hdr.program_headers(LE, linked).expect("phdrs").iter().filter(|p| p.p_type(LE) == elf::PT_LOAD).count();
    if loads != 1 {
        problems.push(format!("expected one load segment, found {loads}"));
    }
    problems
}

//! previrt's post-link patcher: pre-virtualizes kernels and modules that were built without
//! the previrt toolchain.
//!
//! - [`patch`]: every sensitive instruction of a `.o`/`.ko`/vmlinux moves, with as many
//!   neighbours as a 5-byte `jmp` needs, into an out-of-line trampoline where it becomes a
//!   site (producer 2, flag `TRAMPOLINE`); where no safe window exists it stays and gets a
//!   `TRAP` site. Paravirt call sites (`.parainstructions`) become `pv_call` sites in place.
//! - [`verify`]: re-disassembles an original and its patched copy and proves the patch
//!   preserved everything it must.
//! - [`cli`]: `previrt patch` and `previrt verify` (many files in parallel, `--json`).
//! - [`kallsyms`]: the symbols of a stripped vmlinux, from its kallsyms tables.
//!
//! How windows are chosen and which kernel tables are respected: `docs/post-link.md`.

pub mod cli;
pub mod code;
pub mod image;
pub mod kallsyms;
pub mod plan;
pub mod report;
pub mod tables;
pub mod verify;
pub mod write;

pub use plan::Options;
pub use report::FileReport;
pub use verify::{verify, VerifyReport};

/// Why a file was refused. Display is one line without the file name.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not something the patcher can handle safely (bad or unsupported ELF).
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A patched file in memory, with its report.
pub struct Patched {
    pub data: Vec<u8>,
    pub report: FileReport,
}

/// Patch the ELF file `data`.
pub fn patch(data: &[u8], opts: &Options) -> Result<Patched, Error> {
    let img = image::Image::read(data)?;
    let plan = plan::plan(&img, opts);
    let (out, signature_stripped) =
        if img.is_rel() { write::write_object(data, &plan)? } else { (write::write_image(data, &img, &plan)?, false) };
    let report = FileReport::new(&img, &plan, signature_stripped);
    Ok(Patched { data: out, report })
}

//! previrt's rewriter: the x86-64 sensitive-instruction catalogue and the tools built on it.
//!
//! - [`catalogue`]: the table of sensitive instructions ([`catalogue::ENTRIES`]) and
//!   [`catalogue::classify`].
//! - [`record`]: fill a site-ABI [`previrt_site_abi::SiteRecord`] from an instruction
//!   ([`record::operands`]).
//! - [`elf`]: zero-copy x86-64 ELF reading (sections, symbols, relocations, 16/32-bit regions).
//! - [`scan`]: the decode loop ([`scan::scan_code`]) and per-file scans ([`scan::scan_elf`]).
//! - [`sites`]: reading `.previrt.sites` ([`sites::read`]) and coverage ([`sites::coverage`],
//!   [`sites::check_object`]).
//! - [`cli`]: the `previrt scan` command.
//!
//! `catalogue`, `record` and `sites` are used by the assembler wrapper
//! (`cross-compile-wrapper/`) and the post-link patcher; they are kept stable.

pub mod catalogue;
pub mod cli;
pub mod elf;
pub mod record;
pub mod scan;
pub mod sites;

pub use catalogue::{classify, Entry, ENTRIES};
pub use iced_x86;
pub use previrt_site_abi as abi;

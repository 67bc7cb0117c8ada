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
//!
//! # Classify an instruction and fill its site record
//!
//! ```
//! use previrt_rewriter::iced_x86::{Decoder, DecoderOptions};
//! use previrt_rewriter::{abi, catalogue, record};
//!
//! let bytes = [0x0f, 0x22, 0xd8]; // mov %rax,%cr3
//! let instr = Decoder::new(64, &bytes, DecoderOptions::NONE).decode();
//! let entry = catalogue::classify(&instr).expect("sensitive");
//! assert_eq!(entry.name(), "mov_cr");
//! let rec = record::operands(&instr, entry, 64);
//! assert_eq!((rec.insn_len, rec.site_len), (3, 5));
//! assert!(rec.has(abi::flags::WRITE));
//! assert_eq!((rec.reg, rec.base), (abi::reg::gpr(0), abi::reg::cr(3)));
//! // site_rel, save_rel, resume_rel, origin_rel are the caller's to place.
//! ```
//!
//! # Check that an assembled object covers every sensitive instruction
//!
//! ```no_run
//! let data = std::fs::read("foo.o").unwrap();
//! match previrt_rewriter::sites::check_object(&data).unwrap() {
//!     None => println!("no .previrt.sites"),
//!     Some((hits, cov)) => {
//!         println!("{} of {} covered", cov.covered, hits.len());
//!         for u in &cov.uncovered {
//!             println!("{:#x}: {} ({}): {}", u.offset, u.kind.name(), u.reason.token(), u.detail);
//!         }
//!     }
//! }
//! ```

pub mod catalogue;
pub mod cli;
pub mod elf;
pub mod record;
pub mod scan;
pub mod sites;

pub use catalogue::{classify, Entry, ENTRIES};
pub use iced_x86;
pub use previrt_site_abi as abi;

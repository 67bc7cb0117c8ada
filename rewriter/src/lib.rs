//! previrt's rewriter: the x86-64 sensitive-instruction catalogue and the tools built on it.
//!
//! - [`catalogue`]: the table of sensitive instructions ([`catalogue::ENTRIES`]) and
//!   [`catalogue::classify`].
//! - [`record`]: fill a site-ABI [`previrt_site_abi::SiteRecord`] from an instruction
//!   ([`record::operands`]).
//!
//! These APIs are used by the assembler wrapper (`cross-compile-wrapper/`) and the post-link
//! patcher; they are kept stable.

pub mod catalogue;
pub mod record;

pub use catalogue::{classify, Entry, ENTRIES};
pub use iced_x86;
pub use previrt_site_abi as abi;

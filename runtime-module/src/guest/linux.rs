//! What a kernel linked high (Linux) needs from the runtime beyond the generic path.
//!
//! `previrt link` puts the runtime and a copy of the site table into such a kernel's `.text`
//! padding (`__previrt_text_resident`, docs/runtime-entry.md), so:
//! - Linux's earliest code (`startup_64` and what it calls, before the jump to virtual
//!   addresses) runs sites at the image's physical alias: a call from `site − (virt − phys)`
//!   is that site, and it resumes at the alias too;
//! - `.text` is read-only once the kernel has protected it: the runtime's own writes after
//!   boot (counters) clear CR0.WP for their duration.

use super::{hw, link_value};
use crate::emulate::Machine;
use crate::patch::Patcher;

const CR0_WP: u64 = 1 << 16;

fn text_resident() -> bool {
    link_value!("__previrt_text_resident") != 0
}

/// The index position of the site at `at` and the offset to subtract from the site's
/// addresses to get where the caller runs them: 0, or virt − phys for a caller at the
/// physical alias of a text-resident kernel's image.
pub(crate) fn find_site(p: &Patcher, at: u64) -> Option<(usize, u64)> {
    if let Some(i) = p.find(at) {
        return Some((i, 0));
    }
    let delta = link_value!("__previrt_virt_delta");
    match text_resident() && at < delta {
        true => p.find(at.wrapping_add(delta)).map(|i| (i, delta)),
        false => None,
    }
}

/// Run `f` with the runtime's memory writable: CR0.WP cleared when the runtime lives in the
/// kernel's (possibly read-only) text; interrupts are off in the stub, so nothing else runs
/// meanwhile.
pub(crate) fn writable<R>(f: impl FnOnce() -> R) -> R {
    if !text_resident() {
        return f();
    }
    let cr0 = hw::Hardware.read_cr(0);
    if cr0 & CR0_WP != 0 {
        hw::Hardware.write_cr(0, cr0 & !CR0_WP);
    }
    let r = f();
    if cr0 & CR0_WP != 0 {
        hw::Hardware.write_cr(0, cr0);
    }
    r
}

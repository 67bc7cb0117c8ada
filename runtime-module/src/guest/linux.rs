//! What a kernel linked high (Linux) needs from the runtime beyond the generic path.
//!
//! `previrt link` puts the runtime and a copy of the site table into such a kernel's `.text`
//! padding (`__previrt_text_resident`, docs/runtime-entry.md), so:
//! - Linux's earliest code (`startup_64` and what it calls, before the jump to virtual
//!   addresses) runs sites at the image's physical alias: a call from `site − (virt − phys)`
//!   is that site, and it resumes at the alias too;
//! - `.text` is read-only once the kernel has protected it: the runtime's own writes after
//!   boot (counters, module sites) clear CR0.WP for their duration;
//! - modules: `previrt link` makes the kernel's module loader call [`previrt_module_hook`]
//!   at the entry of `module_finalize(hdr, sechdrs, mod)` — after the module's relocations,
//!   before it runs — and the runtime patches the module's `.previrt.sites` for the active
//!   backend (listed in the exit summary). Module sites are indexed after the kernel's
//!   (unsorted, found by a linear scan);
//!   an entry whose site lies in a newly loaded module's memory is dropped first, so a module
//!   loaded where an unloaded one was never finds the old records.

use super::{build_ool, hw, link_value, serial::Com1, serialize, Global, MAX_SITES, OOL, STATE};
use crate::emulate::Machine;
use crate::patch::Patcher;
use core::cell::UnsafeCell;
use core::fmt::Write;

const CR0_WP: u64 = 1 << 16;

fn text_resident() -> bool {
    link_value!("__previrt_text_resident") != 0
}

/// The index position of the site at `at` and the offset to subtract from the site's
/// addresses to get where the caller runs them: 0, or virt − phys for a caller at the
/// physical alias of a text-resident kernel's image.
pub(crate) fn find_site(p: &Patcher, at: u64) -> Option<(usize, u64)> {
    if let Some(i) = p.find(at).or_else(|| module_site(p, at)) {
        return Some((i, 0));
    }
    let delta = link_value!("__previrt_virt_delta");
    match text_resident() && at < delta {
        true => p.find(at.wrapping_add(delta)).map(|i| (i, delta)),
        false => None,
    }
}

/// Index entries after the kernel's that belong to modules.
static MODULE_SITES: Global<usize> = Global(UnsafeCell::new(0));
/// Address and kind of each module site, by position after the kernel's: the profile
/// reports them after their module is gone (its records with it).
static MODULE_KINDS: Global<[(u64, u16); MAX_SITES]> = Global(UnsafeCell::new([(0, 0); MAX_SITES]));

/// Every indexed site's address and kind, in index order (kernel, then modules).
pub(crate) fn site_kinds<'a>(p: &'a Patcher) -> impl Iterator<Item = (u64, u16)> + 'a {
    // SAFETY: kernel index entries name records of the loaded table; module entries were
    // recorded by the hook.
    let kernel = p.index[..p.sites].iter().map(|e| (e.site, unsafe { p.site(e) }.record.kind));
    kernel.chain(unsafe { MODULE_KINDS.get() }[..indexed(p) - p.sites].iter().copied())
}

/// Kernel and module sites: the index positions in use.
pub(crate) fn indexed(p: &Patcher) -> usize {
    // SAFETY: written only by the module hook, with interrupts off.
    p.sites + unsafe { *MODULE_SITES.get() }
}

fn module_site(p: &Patcher, at: u64) -> Option<usize> {
    p.index[p.sites..indexed(p)].iter().position(|e| e.site == at).map(|i| p.sites + i)
}

/// ELF64 offsets the hook reads: `e_shnum`, `e_shstrndx`; section header size and its
/// `sh_name`, `sh_flags`, `sh_addr`, `sh_offset`, `sh_size`; `struct module`'s `name`
/// (after `state` and the `list` head, stable since Linux 2.6).
const E_SHNUM: u64 = 60;
const E_SHSTRNDX: u64 = 62;
const SHDR: u64 = 64;
const SH_FLAGS: u64 = 8;
const SH_ADDR: u64 = 16;
const SH_OFFSET: u64 = 24;
const SH_SIZE: u64 = 32;
const SHF_ALLOC: u64 = 2;
const MODULE_NAME: u64 = 24;
const MODULE_NAME_LEN: usize = 56;

/// A section of the module being loaded: name, flags, address, size.
struct Section<'a> {
    name: &'a [u8],
    flags: u64,
    addr: u64,
    size: u64,
}

/// The sections of the module image at `hdr` (headers at `sechdrs`, as module_finalize gets
/// them: `sh_addr` is where each allocated section now lives).
unsafe fn sections(hdr: u64, sechdrs: u64) -> impl Iterator<Item = Section<'static>> {
    let rd = |a: u64| (a as *const u64).read_unaligned();
    let count = (hdr + E_SHNUM) as *const u16;
    let strndx = ((hdr + E_SHSTRNDX) as *const u16).read_unaligned() as u64;
    let strings = hdr + rd(sechdrs + strndx * SHDR + SH_OFFSET);
    (0..count.read_unaligned() as u64).map(move |i| {
        let sh = sechdrs + i * SHDR;
        let name = (strings + ((sh as *const u32).read_unaligned() as u64)) as *const u8;
        let len = (0..64).find(|&n| name.add(n).read() == 0).unwrap_or(64);
        Section {
            name: core::slice::from_raw_parts(name, len),
            flags: rd(sh + SH_FLAGS),
            addr: rd(sh + SH_ADDR),
            size: rd(sh + SH_SIZE),
        }
    })
}

/// Called by [`previrt_module_hook`] (interrupts off) with `module_finalize`'s arguments.
#[no_mangle]
extern "C" fn previrt_module_loaded(hdr: u64, sechdrs: u64, module: u64) {
    // SAFETY: module_finalize's arguments describe the module being loaded; its memory is
    // still writable; the runtime's own memory is made writable for the duration.
    unsafe { writable(|| patch_module(hdr, sechdrs, module)) }
}

unsafe fn patch_module(hdr: u64, sechdrs: u64, module: u64) {
    let state = STATE.get();
    let Some(p) = state.patcher.as_mut() else { return };
    let Some(table) = sections(hdr, sechdrs).find(|s| s.name == previrt_site_abi::SITES_SECTION.as_bytes()) else {
        return;
    };
    let name: [u8; MODULE_NAME_LEN] = ((module + MODULE_NAME) as *const [u8; MODULE_NAME_LEN]).read();
    let used = indexed(p);
    for s in sections(hdr, sechdrs).filter(|s| s.flags & SHF_ALLOC != 0) {
        for e in p.index[p.sites..used].iter_mut().filter(|e| e.site >= s.addr && e.site < s.addr + s.size) {
            e.site = 0;
        }
    }
    let mut out = Com1;
    let m = match Patcher::prepare(table.addr, table.size as usize, &mut p.index[used..]) {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(out, "previrt: module {}: site table unusable, left unpatched: {e}", text(&name));
            return;
        }
    };
    for (k, e) in m.index[..m.sites].iter().enumerate() {
        let site = m.site(e);
        build_ool(&mut OOL.get()[used + k], &site);
        MODULE_KINDS.get()[used - p.sites + k] = (site.at.site, site.record.kind);
    }
    let stats = m.apply(state.active, state.stub);
    serialize();
    *MODULE_SITES.get() += m.sites;
    let (loads, n) = LOADS.get();
    if let Some(l) = loads.get_mut(*n) {
        *l = Load { name, sites: stats.sites, routed: stats.routed };
    }
    *n += 1;
}

/// One module load, for the exit summary (printing while the kernel's console driver owns the
/// UART could split its lines).
#[derive(Clone, Copy)]
struct Load {
    name: [u8; MODULE_NAME_LEN],
    sites: usize,
    routed: usize,
}

/// The first loads and the number of all loads.
const LOADS_KEPT: usize = 64;
static LOADS: Global<([Load; LOADS_KEPT], usize)> =
    Global(UnsafeCell::new(([Load { name: [0; MODULE_NAME_LEN], sites: 0, routed: 0 }; LOADS_KEPT], 0)));

fn text(name: &[u8]) -> &str {
    core::str::from_utf8(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())]).unwrap_or("?")
}

/// `previrt-trace-module: NAME sites=N routed=R` for every module load the hook patched.
pub(crate) fn module_summary(out: &mut dyn Write) {
    // SAFETY: read-only use of what the hook wrote.
    let (loads, n) = unsafe { LOADS.get() };
    for l in &loads[..(*n).min(LOADS_KEPT)] {
        let _ = writeln!(out, "previrt-trace-module: {} sites={} routed={}", text(&l.name), l.sites, l.routed);
    }
    if *n > LOADS_KEPT {
        let _ = writeln!(out, "previrt-trace-module: {} more loads not listed", *n - LOADS_KEPT);
    }
}

// The module hook: `previrt link` puts `call previrt_module_hook` in front of the first
// instructions of `module_finalize` (moved into `previrt_module_hook_tramp`, followed by a
// jump back). Everything the kernel may rely on is preserved: all caller-saved registers,
// RFLAGS (interrupts are off meanwhile), the argument registers as the kernel passed them.
core::arch::global_asm!(
    r#"
    .section .text.previrt_trace, "ax", @progbits
    .globl previrt_module_hook
previrt_module_hook:
    pushfq
    cli
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbp
    movq %rsp, %rbp
    andq $-16, %rsp
    cld
    call previrt_module_loaded
    movq %rbp, %rsp
    popq %rbp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    popfq
    ret
    /* Filled by previrt link: call previrt_module_hook, the moved instructions, jmp back. */
    .globl previrt_module_hook_tramp
previrt_module_hook_tramp:
    .fill 48, 1, 0xcc
    .text
"#,
    options(att_syntax, raw)
);

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

//! The kernel's GDT under Xen PV (`lgdt` → `set_gdt`): which descriptors a 64-bit PV guest may
//! hand Xen, and how the kernel's are translated into the frames the runtime owns.
//!
//! Xen validates every descriptor of a GDT frame (xen/arch/x86/pv/descriptor-tables.c,
//! `check_descriptor`) and holds the frames read-only for as long as they are a GDT. For a
//! 64-bit PV guest it accepts a descriptor that is not present, any code or data descriptor
//! (raising a DPL below 3 to 3: the guest kernel runs in ring 3), a type-0 system descriptor
//! and a call gate it checks; every other system descriptor (TSS, LDT) is refused. Selectors
//! from `FIRST_RESERVED_GDT_ENTRY` on (0xe000) are Xen's own.
//!
//! So the kernel's table stays where it is, untouched (its reads see what it wrote), and the
//! runtime keeps a translated copy: the same index for every selector, code and data at DPL 3,
//! the 64-bit TSS left out (Xen owns the TSS; `ltr` is ignored under PV). Anything else goes
//! to Xen as the kernel wrote it, so a descriptor Xen refuses stops the domain with Xen's error
//! naming it, not with a guess of ours.

/// Frames a PV guest's GDT may have (`FIRST_RESERVED_GDT_PAGE`): Xen's own descriptors follow.
pub const FRAMES: usize = 14;
/// Descriptors per frame.
pub const PER_FRAME: usize = 512;
/// `FIRST_RESERVED_GDT_ENTRY`: the guest's entries end here; selector `MAX_ENTRIES * 8`
/// (0xe000) and up are Xen's.
pub const MAX_ENTRIES: usize = FRAMES * PER_FRAME;

const PRESENT: u64 = 1 << 47;
/// The S bit: a code or data descriptor (clear: a system descriptor or gate).
const CODE_DATA: u64 = 1 << 44;
const DPL_3: u64 = 3 << 45;
/// System descriptor types of the 64-bit TSS (available, busy).
const TSS_TYPES: [u64; 2] = [0x9, 0xb];

/// Descriptor `d` of the kernel's GDT as the runtime's copy holds it (see the module comment).
pub fn translate(d: u64) -> u64 {
    let system_type = (d >> 40) & 0xf;
    if d & PRESENT == 0 {
        d
    } else if d & CODE_DATA != 0 {
        d | DPL_3
    } else if TSS_TYPES.contains(&system_type) {
        0
    } else {
        d
    }
}

/// Frames a GDT of `entries` descriptors takes (at least one: `set_gdt` needs a frame).
pub fn frames(entries: usize) -> usize {
    entries.div_ceil(PER_FRAME).max(1)
}

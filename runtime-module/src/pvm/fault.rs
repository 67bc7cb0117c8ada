//! The address a #PF is about, without reading CR2 (a trap to the host in KVM-PVM's native
//! mode, ~5 µs: as much as the fault's delivery). Decoded from the faulting instruction for
//! the plain one-operand memory forms (mov, movzx/movsx, ALU with a memory operand, test,
//! group 1, inc/dec) whose one access stays in one page: CR2 is then that operand's linear
//! address exactly. Anything else (other opcodes, prefixes that change the address or the
//! size, segment overrides, string and stack instructions, a fetch fault, an access that may
//! cross a page) is None: the caller reads CR2.

use super::shadow;

/// Opcodes with a ModRM memory operand and one data access: (opcode, two-byte map, the
/// access is one byte, immediate bytes after the operand (4 = imm32, or imm16 with 0x66)).
const FORMS: &[(u8, bool, bool, u8)] = &[
    (0x88, false, true, 0),  // mov r/m8, r8
    (0x89, false, false, 0), // mov r/m, r
    (0x8a, false, true, 0),  // mov r8, r/m8
    (0x8b, false, false, 0), // mov r, r/m
    (0xc6, false, true, 1),  // mov r/m8, imm8
    (0xc7, false, false, 4), // mov r/m, imm32
    (0x63, false, false, 0), // movsxd (a 4-byte access; 8 with REX.W taken as the bound)
    (0x01, false, false, 0), // add
    (0x03, false, false, 0),
    (0x09, false, false, 0), // or
    (0x0b, false, false, 0),
    (0x21, false, false, 0), // and
    (0x23, false, false, 0),
    (0x29, false, false, 0), // sub
    (0x2b, false, false, 0),
    (0x31, false, false, 0), // xor
    (0x33, false, false, 0),
    (0x39, false, false, 0), // cmp
    (0x3b, false, false, 0),
    (0x85, false, false, 0), // test
    (0x80, false, true, 1),  // group 1, imm8
    (0x81, false, false, 4), // group 1, imm32
    (0x83, false, false, 1), // group 1, imm8
    (0xb6, true, true, 0),   // movzx r, r/m8
    (0xbe, true, true, 0),   // movsx r, r/m8
    (0xb7, true, false, 0),  // movzx r, r/m16 (bound: the operand size)
    (0xbf, true, false, 0),  // movsx r, r/m16
];

/// The GPR `n` (0 rax … 15 r15) of a #PF frame: 15 saved GPRs (r15 at 0 … rax at 14), the
/// error code, RIP, CS, RFLAGS, RSP, SS.
fn gpr(frame: &[u64; 21], n: u8) -> u64 {
    const AT: [usize; 16] = [14, 12, 11, 13, 19, 8, 10, 9, 7, 6, 5, 4, 3, 2, 1, 0];
    frame[AT[n as usize & 15]]
}

/// The faulting access's linear address, when the instruction at the frame's RIP is one of
/// [`FORMS`] and its access cannot cross a page; `cr3` is the live copy (the instruction
/// bytes must be mapped there, else the fault may be the fetch's).
pub fn address(frame: &[u64; 21], cr3: u64) -> Option<u64> {
    let rip = frame[16];
    // The bytes readable without faulting: up to 15, within the mapped page(s).
    shadow::shadow_allows(cr3, rip, false)?;
    let mut avail = 0x1000 - (rip & 0xfff) as usize;
    if avail < 15 && shadow::shadow_allows(cr3, rip + avail as u64, false).is_some() {
        avail = 15;
    }
    let mut b = [0u8; 15];
    let n = avail.min(15);
    // SAFETY: the kernel's instruction bytes, mapped in the live copy (checked above).
    unsafe { core::ptr::copy_nonoverlapping(rip as *const u8, b.as_mut_ptr(), n) };
    let b = &b[..n];
    let mut i = 0;
    let mut opsize16 = false;
    // Legacy prefixes that change neither the address nor the access: lock, and the null
    // segments of 64-bit mode. 0x66 only narrows the access.
    while let Some(&p) = b.get(i) {
        match p {
            0xf0 | 0x2e | 0x3e | 0x26 | 0x36 => {}
            0x66 => opsize16 = true,
            _ => break,
        }
        i += 1;
    }
    let rex = match b.get(i)? {
        r @ 0x40..=0x4f => {
            i += 1;
            *r
        }
        _ => 0,
    };
    let two_byte = *b.get(i)? == 0x0f;
    i += usize::from(two_byte);
    let op = *b.get(i)?;
    let &(_, _, byte, imm) = FORMS.iter().find(|f| f.0 == op && f.1 == two_byte)?;
    i += 1;
    let modrm = *b.get(i)?;
    i += 1;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if md == 3 {
        return None;
    }
    let rex_b = (rex & 1) << 3;
    let mut ea: u64;
    let mut rip_relative = false;
    if rm == 4 {
        let sib = *b.get(i)?;
        i += 1;
        let (scale, index, base) = (sib >> 6, ((sib >> 3) & 7) | ((rex & 2) << 2), sib & 7);
        ea = if index == 4 { 0 } else { gpr(frame, index) << scale };
        if base == 5 && md == 0 {
            ea = ea.wrapping_add(i32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as u64);
            i += 4;
        } else {
            ea = ea.wrapping_add(gpr(frame, base | rex_b));
        }
    } else if rm == 5 && md == 0 {
        rip_relative = true;
        ea = 0;
    } else {
        ea = gpr(frame, rm | rex_b);
    }
    let disp = match (md, rip_relative) {
        (1, _) => {
            i += 1;
            *b.get(i - 1)? as i8 as i64
        }
        (2, _) | (0, true) => {
            i += 4;
            i32::from_le_bytes(b.get(i - 4..i)?.try_into().ok()?) as i64
        }
        _ => 0,
    };
    ea = ea.wrapping_add(disp as u64);
    let imm_len = match imm {
        4 if opsize16 => 2,
        n => n as usize,
    };
    let len = i + imm_len;
    if len > b.len() {
        return None;
    }
    if rip_relative {
        ea = ea.wrapping_add(rip + len as u64);
    }
    let size = if byte {
        1
    } else if rex & 8 != 0 {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    ((ea & 0xfff) + size <= 0x1000).then_some(ea)
}

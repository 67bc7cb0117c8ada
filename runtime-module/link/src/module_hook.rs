//! The module-loading hook for Linux kernels (docs/runtime-entry.md, "Modules").
//!
//! The runtime must patch a module's `.previrt.sites` after the module loader has applied the
//! module's relocations and before any of its code runs. x86 Linux's `module_finalize(hdr,
//! sechdrs, mod)` is that point (called from `post_relocation`, before `complete_formation`
//! makes the module's text read-only). A stripped vmlinux still has kallsyms
//! (`previrt_postlink::kallsyms`): `module_finalize` and `__fentry__` are found by name. The
//! first whole instructions after the function's `__fentry__` call (after `endbr64`, if any;
//! ≥ 5 bytes, none relative to RIP or changing control flow) move into the runtime's
//! `previrt_module_hook_tramp` behind a `call previrt_module_hook`; a `jmp` to the trampoline
//! replaces them. The `__fentry__` call itself stays (ftrace checks and rewrites it).

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use object::read::elf::{FileHeader, SectionHeader};
use object::{elf, LittleEndian as LE};
use previrt_postlink::kallsyms::Kallsyms;

/// Where the hook goes.
#[derive(Debug, Clone)]
pub struct Hook {
    /// `module_finalize`'s entry.
    pub function: u64,
    /// First moved instruction (after the `__fentry__` call), its file offset, and the
    /// moved bytes.
    pub at: u64,
    pub file_offset: usize,
    pub moved: Vec<u8>,
}

const CALL: u8 = 0xe8;
const JMP: u8 = 0xe9;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Find `module_finalize` and the instructions to move; None when the kernel has no kallsyms
/// or no such function, or its first instructions cannot move.
pub fn find(data: &[u8]) -> Option<Hook> {
    let hdr = elf::FileHeader64::<LE>::parse(data).ok()?;
    let sections = hdr.sections(LE, data).ok()?;
    let (_, rodata) = sections.section_by_name(LE, b".rodata")?;
    let (_, text) = sections.section_by_name(LE, b".text")?;
    let (ro, code) = (rodata.data(LE, data).ok()?, text.data(LE, data).ok()?);
    let base = text.sh_addr(LE);
    let syms = Kallsyms::read(ro, base)?;
    let function = syms.get("module_finalize")?;
    let entry = usize::try_from(function.checked_sub(base)?).ok().filter(|&e| e < code.len())?;
    let mut start = if code[entry..].starts_with(&ENDBR64) { entry + 4 } else { entry };
    let called = |at: usize| {
        let rel = i32::from_le_bytes(code.get(at + 1..at + 5)?.try_into().ok()?) as i64;
        (code[at] == CALL).then(|| (base as i64 + at as i64 + 5 + rel) as u64)
    };
    if syms.get("__fentry__").is_some_and(|f| called(start) == Some(f)) {
        start += 5;
    }
    let mut decoder = Decoder::with_ip(64, code.get(start..)?, base + start as u64, DecoderOptions::NONE);
    let mut len = 0;
    while len < 5 {
        let insn = decoder.decode();
        if insn.is_invalid() || insn.is_ip_rel_memory_operand() || insn.flow_control() != FlowControl::Next {
            return None;
        }
        len += insn.len();
    }
    Some(Hook {
        function,
        at: base + start as u64,
        file_offset: text.sh_offset(LE) as usize + start,
        moved: code[start..start + len].to_vec(),
    })
}

/// The trampoline at `tramp`: `call hook`, the moved instructions, `jmp` back after them.
pub fn trampoline(h: &Hook, tramp: u64, hook: u64) -> Option<Vec<u8>> {
    let mut t = vec![CALL];
    t.extend_from_slice(&i32::try_from(hook as i64 - (tramp as i64 + 5)).ok()?.to_le_bytes());
    t.extend_from_slice(&h.moved);
    let back = h.at + h.moved.len() as u64;
    t.push(JMP);
    let from = tramp + t.len() as u64 + 4;
    t.extend_from_slice(&i32::try_from(back as i64 - from as i64).ok()?.to_le_bytes());
    Some(t)
}

/// The bytes replacing the moved instructions: `jmp tramp`, then `int3`.
pub fn entry_jump(h: &Hook, tramp: u64) -> Option<Vec<u8>> {
    let mut j = vec![JMP];
    j.extend_from_slice(&i32::try_from(tramp as i64 - (h.at as i64 + 5)).ok()?.to_le_bytes());
    j.resize(h.moved.len(), 0xcc);
    Some(j)
}

//! The module-loading hook for Linux kernels (docs/runtime-entry.md, "Modules").
//!
//! The runtime must patch a module's `.previrt.sites` after the module loader has applied the
//! module's relocations and before any of its code runs. x86 Linux's `module_finalize(hdr,
//! sechdrs, mod)` is that point (called from `post_relocation`, before `complete_formation`
//! makes the module's text read-only). A stripped vmlinux has no symbol table, so the function
//! is found by what it does: it is the function that passes the section name
//! `".parainstructions"` to `strcmp` (`mov $name, %rdi`). Its entry is the nearest preceding
//! 16-byte aligned `call __fentry__` (optionally after `endbr64`); `__fentry__` is the most
//! frequent target of a `call` at a 16-byte aligned address. The first whole instructions
//! after that call (≥ 5 bytes, none relative to RIP or changing control flow) move into the
//! runtime's `previrt_module_hook_tramp` behind a `call previrt_module_hook`; a `jmp` to the
//! trampoline replaces them. The `__fentry__` call itself stays (ftrace checks and rewrites it).

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use object::read::elf::{FileHeader, SectionHeader};
use object::{elf, LittleEndian as LE};
use std::collections::HashMap;

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
/// `mov $imm32, %rdi`: the first argument of `strcmp`.
const MOV_IMM_RDI: [u8; 3] = [0x48, 0xc7, 0xc7];
const NAME: &[u8] = b".parainstructions\0";

fn rel32(b: &[u8], at: usize) -> i64 {
    i32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as i64
}

/// Find `module_finalize` and the instructions to move; None when the kernel does not look
/// like x86 Linux with ftrace.
pub fn find(data: &[u8]) -> Option<Hook> {
    let hdr = elf::FileHeader64::<LE>::parse(data).ok()?;
    let sections = hdr.sections(LE, data).ok()?;
    let (_, rodata) = sections.section_by_name(LE, b".rodata")?;
    let (_, text) = sections.section_by_name(LE, b".text")?;
    let (ro, code) = (rodata.data(LE, data).ok()?, text.data(LE, data).ok()?);
    let base = text.sh_addr(LE);
    let name = ro.windows(NAME.len()).position(|w| w == NAME).map(|i| rodata.sh_addr(LE) + i as u64)?;
    let mut pattern = MOV_IMM_RDI.to_vec();
    pattern.extend_from_slice(&(name as u32).to_le_bytes());
    let reference = code.windows(pattern.len()).position(|w| w == pattern)?;

    let target = |at: usize| (base as i64 + at as i64 + 5 + rel32(code, at + 1)) as u64;
    let mut calls: HashMap<u64, usize> = HashMap::new();
    for at in (0..code.len().saturating_sub(5)).step_by(16).filter(|&at| code[at] == CALL) {
        *calls.entry(target(at)).or_default() += 1;
    }
    let fentry = calls.into_iter().max_by_key(|&(_, n)| n)?.0;
    let (entry, call) = (0..=reference / 16).rev().map(|k| k * 16).find_map(|at| {
        let call = if code[at..].starts_with(&ENDBR64) { at + 4 } else { at };
        (code.get(call) == Some(&CALL) && target(call) == fentry).then_some((at, call))
    })?;

    let start = call + 5;
    let mut decoder = Decoder::with_ip(64, &code[start..], base + start as u64, DecoderOptions::NONE);
    let mut len = 0;
    while len < 5 {
        let insn = decoder.decode();
        if insn.is_invalid() || insn.is_ip_rel_memory_operand() || insn.flow_control() != FlowControl::Next {
            return None;
        }
        len += insn.len();
    }
    Some(Hook {
        function: base + entry as u64,
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

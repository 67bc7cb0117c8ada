//! The symbols of a stripped Linux vmlinux, read from its kallsyms tables (`.rodata`).
//!
//! Layout as `scripts/kallsyms.c` (Linux 6.1, base-relative, absolute per-CPU) writes it, each
//! table 8-byte aligned: `kallsyms_offsets` (`s32` per symbol), `kallsyms_relative_base`
//! (`u64`), `kallsyms_num_syms` (`u32`), `kallsyms_names` (per symbol a ULEB128 length and that
//! many token numbers; the first character is the type), `kallsyms_markers`,
//! `kallsyms_seqs_of_names`, `kallsyms_token_table` (256 NUL-terminated strings) and
//! `kallsyms_token_index` (256 `u16` offsets into it). Without symbols the tables are found by
//! their shape: the token index is the only 256-entry increasing `u16` array starting at 0 whose
//! offsets all follow a NUL of the table before it; the relative base is the lowest text
//! address (`_text`), followed by the symbol count, with exactly that many offsets before it.
//! An offset ≥ 0 is an absolute value (per-CPU symbols), else the address is
//! `relative_base − 1 − offset`.

use std::collections::HashMap;

const TOKENS: usize = 256;
/// Longest token the search accepts (kallsyms tokens are short substrings of names).
const MAX_TOKEN: usize = 64;

/// Symbol name → address.
#[derive(Debug, Default)]
pub struct Kallsyms {
    symbols: HashMap<String, u64>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The token table's offset and its 256 tokens, given `.rodata`.
fn tokens(ro: &[u8]) -> Option<(usize, Vec<&[u8]>)> {
    for index in (0..ro.len().saturating_sub(2 * TOKENS)).step_by(8) {
        if u16_at(ro, index) != 0 || u16_at(ro, index + 2) == 0 {
            continue;
        }
        let idx: Vec<usize> = (0..TOKENS).map(|i| u16_at(ro, index + 2 * i) as usize).collect();
        if idx[0] != 0 || idx.windows(2).any(|w| w[1] <= w[0] || w[1] - w[0] > MAX_TOKEN) {
            continue;
        }
        // The table ends (8-aligned) where the index starts: try each length of the last token.
        for last in 1..MAX_TOKEN {
            let Some(table) = index.checked_sub(idx[TOKENS - 1] + last + 1).map(|t| t & !7) else { break };
            let end = table + idx[TOKENS - 1] + last;
            if end >= index || ro[end] != 0 || index - (end + 1) >= 8 {
                continue;
            }
            let strings: Option<Vec<&[u8]>> = idx
                .iter()
                .map(|&o| {
                    let s = &ro[table + o..];
                    s.iter().position(|&b| b == 0).filter(|&n| n > 0).map(|n| &s[..n])
                })
                .collect();
            if let Some(t) =
                strings.filter(|t| idx.iter().skip(1).all(|&o| ro[table + o - 1] == 0) && t.len() == TOKENS)
            {
                return Some((table, t));
            }
        }
    }
    None
}

impl Kallsyms {
    /// Read the symbols from `.rodata` (its bytes and address); `text` is the address of
    /// `_text` (the relative base). None when the tables are not found or do not decode.
    pub fn read(ro: &[u8], text: u64) -> Option<Kallsyms> {
        let (table, tokens) = tokens(ro)?;
        let (base, count) = (0..table).step_by(8).find_map(|at| {
            let n = u32_at(ro, at + 8) as usize;
            let offsets = (n * 4).div_ceil(8) * 8;
            (u64_at(ro, at) == text && n > 0 && offsets <= at).then_some((at, n))
        })?;
        let offsets = base - (count * 4).div_ceil(8) * 8;
        let mut at = base + 16;
        let mut symbols = HashMap::with_capacity(count);
        for i in 0..count {
            let mut len = *ro.get(at)? as usize;
            at += 1;
            if len & 0x80 != 0 {
                len = (len & 0x7f) | (*ro.get(at)? as usize) << 7;
                at += 1;
            }
            let name: Vec<u8> =
                ro.get(at..at + len)?.iter().flat_map(|&t| tokens[t as usize].iter().copied()).collect();
            at += len;
            let off = u32_at(ro, offsets + 4 * i) as i32;
            let addr = if off >= 0 { off as u64 } else { text.wrapping_sub(1).wrapping_sub(off as i64 as u64) };
            // The first character is the symbol's type.
            let name = String::from_utf8_lossy(name.get(1..)?).into_owned();
            symbols.entry(name).or_insert(addr);
        }
        Some(Kallsyms { symbols })
    }

    /// The address of `name` (the first symbol of that name).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

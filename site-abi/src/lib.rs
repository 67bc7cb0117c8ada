//! The previrt site ABI: how a pre-virtualized binary tells the guest runtime where its
//! virtualization-sensitive instructions and memory accesses are.
//!
//! Producers (the assembler wrapper, the post-link patcher, the annotator) emit *chunks* into
//! the ELF section [`SITES_SECTION`]: a [`ChunkHeader`] followed by `count` fixed-size
//! [`SiteRecord`]s. The linker concatenates the chunks of every object; nothing else is
//! needed from it. Every address in a record is a 32-bit offset relative to the address of
//! the field that holds it (like Linux's `.altinstructions`), so a table is valid unchanged in
//! a relocatable object, a linked kernel at any load address (KASLR) and a kernel module.
//!
//! The layout is documented field by field in `docs/site-abi.md`; this crate is the
//! reference implementation, `no_std` so the guest runtime and the hypervisor share it.

#![no_std]

/// ELF section holding the site chunks.
pub const SITES_SECTION: &str = ".previrt.sites";
/// ELF section holding one save slot per site (`insn_len` bytes, zero in the file). The
/// runtime copies the relocated original instruction there before it first patches a site,
/// so any later backend (e.g. native after a migration) can restore it exactly.
pub const SAVE_SECTION: &str = ".previrt.save";

/// `"PVST"` little-endian: marks the start of a chunk.
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"PVST");
/// Current ABI version. Readers accept exactly the versions they know.
pub const ABI_VERSION: u16 = 1;
/// Size of a [`ChunkHeader`] in bytes.
pub const HEADER_SIZE: usize = 16;
/// Size of a [`SiteRecord`] in bytes (version 1).
pub const RECORD_SIZE: usize = 32;
/// Chunks are 4-byte aligned; the linker may pad between them with zeros.
pub const CHUNK_ALIGN: usize = 4;

/// What went wrong while reading a site table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiError {
    /// The table ends inside a header or record.
    Truncated { offset: usize },
    /// Bytes at `offset` are neither a chunk header nor alignment padding.
    BadMagic { offset: usize },
    /// A chunk of an ABI version this reader does not know.
    UnknownVersion { offset: usize, version: u16 },
    /// A chunk whose record size does not match its version.
    BadRecordSize { offset: usize, size: u16 },
}

impl core::fmt::Display for AbiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            AbiError::Truncated { offset } => write!(f, "site table truncated at offset {offset:#x}"),
            AbiError::BadMagic { offset } => write!(f, "no site chunk header at offset {offset:#x}"),
            AbiError::UnknownVersion { offset, version } => {
                write!(f, "site chunk at {offset:#x} has unknown ABI version {version}")
            }
            AbiError::BadRecordSize { offset, size } => {
                write!(f, "site chunk at {offset:#x} has record size {size}, expected {RECORD_SIZE}")
            }
        }
    }
}

/// Who wrote a chunk. Informational; lets reports and `previrt verify` tell the paths apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Producer {
    Unknown = 0,
    /// The assembler wrapper: sites are the original instruction followed by scratch bytes.
    Assembler = 1,
    /// The post-link patcher: sites live in out-of-line trampolines.
    PostLink = 2,
    /// The annotator: memory-access sites.
    Annotate = 3,
}

impl Producer {
    pub fn from_u16(v: u16) -> Producer {
        match v {
            1 => Producer::Assembler,
            2 => Producer::PostLink,
            3 => Producer::Annotate,
            _ => Producer::Unknown,
        }
    }
}

/// The broad reason an instruction kind is sensitive. Backends and reports group by class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Reads or writes the interrupt flag.
    InterruptFlag,
    /// Control, debug, segment and descriptor-table state.
    SystemState,
    /// TLB and cache management.
    MemoryManagement,
    /// Port I/O.
    Io,
    /// Model-specific registers and CPU identity.
    MsrCpuid,
    /// Privilege and control transitions, idling, hypervisor calls.
    Transition,
    /// Time stamp counter: sensitive, but not patched by default.
    Time,
    /// Loads and stores to MMIO or page-table memory (from annotations).
    MemoryAccess,
    /// An existing paravirtualization call site (Linux `.parainstructions`).
    ParavirtCall,
}

impl Class {
    pub const fn name(self) -> &'static str {
        match self {
            Class::InterruptFlag => "interrupt_flag",
            Class::SystemState => "system_state",
            Class::MemoryManagement => "memory_management",
            Class::Io => "io",
            Class::MsrCpuid => "msr_cpuid",
            Class::Transition => "transition",
            Class::Time => "time",
            Class::MemoryAccess => "memory_access",
            Class::ParavirtCall => "paravirt_call",
        }
    }
}

macro_rules! kinds {
    ($( $variant:ident = $id:literal, $name:literal, $class:ident; )*) => {
        /// A site kind. The numeric value is stored in records and is stable across versions:
        /// new kinds get new numbers, numbers are never reused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum Kind { $( $variant = $id, )* }

        /// Every kind with its report name and class, in numeric order.
        pub const KINDS: &[KindInfo] = &[ $( KindInfo { kind: Kind::$variant, name: $name, class: Class::$class }, )* ];
    };
}

/// One row of the kind table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: Kind,
    /// Report name: the lowercase mnemonic without size suffix (or a fixed compound name).
    pub name: &'static str,
    pub class: Class,
}

kinds! {
    Cli = 1, "cli", InterruptFlag;
    Sti = 2, "sti", InterruptFlag;
    Pushf = 3, "pushf", InterruptFlag;
    Popf = 4, "popf", InterruptFlag;
    Iret = 5, "iret", InterruptFlag;

    MovCr = 16, "mov_cr", SystemState;
    MovDr = 17, "mov_dr", SystemState;
    Clts = 18, "clts", SystemState;
    Lmsw = 19, "lmsw", SystemState;
    Smsw = 20, "smsw", SystemState;
    MovSeg = 21, "mov_seg", SystemState;
    PushSeg = 22, "push_seg", SystemState;
    PopSeg = 23, "pop_seg", SystemState;
    Lgdt = 24, "lgdt", SystemState;
    Lidt = 25, "lidt", SystemState;
    Lldt = 26, "lldt", SystemState;
    Ltr = 27, "ltr", SystemState;
    Sgdt = 28, "sgdt", SystemState;
    Sidt = 29, "sidt", SystemState;
    Sldt = 30, "sldt", SystemState;
    Str = 31, "str", SystemState;
    Lar = 32, "lar", SystemState;
    Lsl = 33, "lsl", SystemState;
    Verr = 34, "verr", SystemState;
    Verw = 35, "verw", SystemState;
    FarCall = 36, "far_call", SystemState;
    FarJmp = 37, "far_jmp", SystemState;
    FarRet = 38, "far_ret", SystemState;

    Invlpg = 48, "invlpg", MemoryManagement;
    Invpcid = 49, "invpcid", MemoryManagement;
    Invd = 50, "invd", MemoryManagement;
    Wbinvd = 51, "wbinvd", MemoryManagement;

    In = 64, "in", Io;
    Out = 65, "out", Io;
    Ins = 66, "ins", Io;
    Outs = 67, "outs", Io;

    Rdmsr = 80, "rdmsr", MsrCpuid;
    Wrmsr = 81, "wrmsr", MsrCpuid;
    Cpuid = 82, "cpuid", MsrCpuid;
    Rdpmc = 83, "rdpmc", MsrCpuid;
    Xsetbv = 84, "xsetbv", MsrCpuid;
    Rdfsbase = 85, "rdfsbase", MsrCpuid;
    Rdgsbase = 86, "rdgsbase", MsrCpuid;
    Wrfsbase = 87, "wrfsbase", MsrCpuid;
    Wrgsbase = 88, "wrgsbase", MsrCpuid;
    Swapgs = 89, "swapgs", MsrCpuid;

    Hlt = 96, "hlt", Transition;
    Sysret = 97, "sysret", Transition;
    Sysexit = 98, "sysexit", Transition;
    Int = 99, "int", Transition;
    Monitor = 100, "monitor", Transition;
    Mwait = 101, "mwait", Transition;
    Vmcall = 102, "vmcall", Transition;
    Vmmcall = 103, "vmmcall", Transition;

    Rdtsc = 112, "rdtsc", Time;
    Rdtscp = 113, "rdtscp", Time;

    MmioRead = 128, "mmio_read", MemoryAccess;
    MmioWrite = 129, "mmio_write", MemoryAccess;
    PtRead = 130, "pt_read", MemoryAccess;
    PtWrite = 131, "pt_write", MemoryAccess;

    PvCall = 144, "pv_call", ParavirtCall;
}

impl Kind {
    /// The table row for this kind.
    pub fn info(self) -> &'static KindInfo {
        // KINDS is small and ordered; a linear scan keeps this const-table-driven.
        KINDS.iter().find(|k| k.kind == self).expect("every Kind has a KINDS row")
    }
    pub fn name(self) -> &'static str {
        self.info().name
    }
    pub fn class(self) -> Class {
        self.info().class
    }
    pub fn from_u16(v: u16) -> Option<Kind> {
        KINDS.iter().find(|k| k.kind as u16 == v).map(|k| k.kind)
    }
    pub fn from_name(name: &str) -> Option<Kind> {
        KINDS.iter().find(|k| k.name == name).map(|k| k.kind)
    }
}

/// Register operand encoding used in records: one byte, class in the high nibble, the
/// hardware register number in the low nibble. `0` means "no register".
pub mod reg {
    pub const NONE: u8 = 0;
    /// General-purpose register `n` (0 = rax … 15 = r15); the width is in the record.
    pub const fn gpr(n: u8) -> u8 {
        0x10 | (n & 0xf)
    }
    /// Control register `n` (cr0 … cr15).
    pub const fn cr(n: u8) -> u8 {
        0x20 | (n & 0xf)
    }
    /// Debug register `n` (dr0 … dr15).
    pub const fn dr(n: u8) -> u8 {
        0x30 | (n & 0xf)
    }
    /// Segment register in hardware order: 0 es, 1 cs, 2 ss, 3 ds, 4 fs, 5 gs.
    pub const fn seg(n: u8) -> u8 {
        0x40 | (n & 0xf)
    }
    /// The instruction pointer (RIP-relative memory operands).
    pub const RIP: u8 = 0x50;

    pub const fn class(r: u8) -> u8 {
        r & 0xf0
    }
    pub const fn number(r: u8) -> u8 {
        r & 0x0f
    }
    pub const GPR: u8 = 0x10;
    pub const CR: u8 = 0x20;
    pub const DR: u8 = 0x30;
    pub const SEG: u8 = 0x40;
}

/// Bits of [`SiteRecord::flags`].
pub mod flags {
    /// The site writes the special register / port / memory (`mov %rax,%cr3`, `out`,
    /// `mov %rax,(pte)`), as opposed to reading it.
    pub const WRITE: u16 = 1 << 0;
    /// Port I/O with an immediate port number (in `imm`); otherwise the port is in %dx.
    pub const IMM_PORT: u16 = 1 << 1;
    /// A `rep` prefix is present (string I/O).
    pub const REP: u16 = 1 << 2;
    /// The instruction has a memory operand (`base`, `index`, `scale`, `disp`).
    pub const MEM: u16 = 1 << 3;
    /// The memory operand is RIP-relative. `disp` is then the byte offset of the 32-bit
    /// displacement within the instruction: read it from the relocated save copy.
    pub const RIP_RELATIVE: u16 = 1 << 4;
    /// The site is in 32-bit code (records exist only for trap-based fallback sites).
    pub const CODE32: u16 = 1 << 5;
    /// The site is in 16-bit code (likewise).
    pub const CODE16: u16 = 1 << 6;
    /// The site lies in an alternatives replacement (`.altinstr_replacement`): it runs only
    /// after the kernel copies it, so it is patched where it is, before that copy.
    pub const IN_ALTINSTR: u16 = 1 << 7;
    /// The site is in an init section the kernel frees after boot; never patch it later.
    pub const INIT: u16 = 1 << 8;
    /// Post-link: the site is an out-of-line trampoline reached by a jump from `origin`;
    /// after the site, execution continues at `resume`.
    pub const TRAMPOLINE: u16 = 1 << 9;
    /// No scratch space: the instruction stays where it is and is handled when it traps
    /// (or after the runtime writes a 1-byte `int3`). `site_len == insn_len`.
    pub const TRAP: u16 = 1 << 10;
    /// Operand-size prefix or REX.W changes the operand size (`pushfw`, `iretq`, `sysretq`).
    pub const WIDE: u16 = 1 << 11;
}

/// Header of one chunk in [`SITES_SECTION`]. 16 bytes, little-endian, 4-byte aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// [`CHUNK_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`] of the records that follow.
    pub version: u16,
    /// Size of each record in bytes ([`RECORD_SIZE`] for version 1).
    pub record_size: u16,
    /// Number of records that follow.
    pub count: u32,
    /// [`Producer`] as a number.
    pub producer: u16,
    /// Owned by the runtime (zero in files): bit 0 = originals saved.
    pub state: u16,
}

impl ChunkHeader {
    pub const STATE_SAVED: u16 = 1;

    pub fn new(producer: Producer, count: u32) -> ChunkHeader {
        ChunkHeader {
            magic: CHUNK_MAGIC,
            version: ABI_VERSION,
            record_size: RECORD_SIZE as u16,
            count,
            producer: producer as u16,
            state: 0,
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.record_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..14].copy_from_slice(&self.producer.to_le_bytes());
        b[14..16].copy_from_slice(&self.state.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> ChunkHeader {
        ChunkHeader {
            magic: le32(b, 0),
            version: le16(b, 4),
            record_size: le16(b, 6),
            count: le32(b, 8),
            producer: le16(b, 12),
            state: le16(b, 14),
        }
    }
}

/// One site. 32 bytes, little-endian, 4-byte aligned. Offsets named `*_rel` are relative to
/// the address of the field itself; use [`SiteRecord::resolve`] to turn them into addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SiteRecord {
    /// +0: first byte of the site (the instruction, followed by scratch bytes).
    pub site_rel: i32,
    /// +4: the site's save slot in [`SAVE_SECTION`] (`insn_len` bytes).
    pub save_rel: i32,
    /// +8: [`Kind`] as a number.
    pub kind: u16,
    /// +10: [`flags`] bits.
    pub flags: u16,
    /// +12: bytes the runtime may overwrite: instruction plus scratch.
    pub site_len: u8,
    /// +13: length of the original instruction.
    pub insn_len: u8,
    /// +14: operand width in bytes (1, 2, 4, 8; descriptor-table operands 10), 0 if none.
    pub width: u8,
    /// +15: register operand ([`reg`] encoding): data register of a move/in/out/MMIO access,
    /// or the special register itself (CR/DR/segment) when there is no GPR.
    pub reg: u8,
    /// +16: the special register of `mov_cr`/`mov_dr`/`mov_seg`/`*_seg`, or the memory base.
    pub base: u8,
    /// +17: memory index register ([`reg`] encoding) or 0.
    pub index: u8,
    /// +18: memory scale (1, 2, 4, 8) or 0.
    pub scale: u8,
    /// +19: reserved, zero.
    pub reserved: u8,
    /// +20: memory displacement, or the immediate (port number, interrupt vector, far
    /// selector, `far_ret` pop count), or see [`flags::RIP_RELATIVE`].
    pub imm: i32,
    /// +24: where execution continues after the site. Assembler path: `site + site_len`.
    pub resume_rel: i32,
    /// +28: where the instruction stood in the original code. Assembler path: the site.
    pub origin_rel: i32,
}

/// Byte offsets of the PC-relative fields inside a record.
pub mod field {
    pub const SITE: usize = 0;
    pub const SAVE: usize = 4;
    pub const KIND: usize = 8;
    pub const FLAGS: usize = 10;
    pub const SITE_LEN: usize = 12;
    pub const INSN_LEN: usize = 13;
    pub const WIDTH: usize = 14;
    pub const REG: usize = 15;
    pub const BASE: usize = 16;
    pub const INDEX: usize = 17;
    pub const SCALE: usize = 18;
    pub const IMM: usize = 20;
    pub const RESUME: usize = 24;
    pub const ORIGIN: usize = 28;
}

/// Addresses of a record's targets, resolved for a table loaded at a known address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub site: u64,
    pub save: u64,
    pub resume: u64,
    pub origin: u64,
}

impl SiteRecord {
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_u16(self.kind)
    }
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Resolve the PC-relative fields of a record that starts at address `record_addr`.
    pub fn resolve(&self, record_addr: u64) -> Resolved {
        let at = |field: usize, rel: i32| record_addr.wrapping_add(field as u64).wrapping_add(rel as i64 as u64);
        Resolved {
            site: at(field::SITE, self.site_rel),
            save: at(field::SAVE, self.save_rel),
            resume: at(field::RESUME, self.resume_rel),
            origin: at(field::ORIGIN, self.origin_rel),
        }
    }

    /// Set the PC-relative fields so that, placed at `record_addr`, they point at `to`.
    pub fn set_targets(&mut self, record_addr: u64, to: Resolved) {
        let rel = |field: usize, target: u64| target.wrapping_sub(record_addr.wrapping_add(field as u64)) as i64 as i32;
        self.site_rel = rel(field::SITE, to.site);
        self.save_rel = rel(field::SAVE, to.save);
        self.resume_rel = rel(field::RESUME, to.resume);
        self.origin_rel = rel(field::ORIGIN, to.origin);
    }

    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..4].copy_from_slice(&self.site_rel.to_le_bytes());
        b[4..8].copy_from_slice(&self.save_rel.to_le_bytes());
        b[8..10].copy_from_slice(&self.kind.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12] = self.site_len;
        b[13] = self.insn_len;
        b[14] = self.width;
        b[15] = self.reg;
        b[16] = self.base;
        b[17] = self.index;
        b[18] = self.scale;
        b[19] = self.reserved;
        b[20..24].copy_from_slice(&self.imm.to_le_bytes());
        b[24..28].copy_from_slice(&self.resume_rel.to_le_bytes());
        b[28..32].copy_from_slice(&self.origin_rel.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; RECORD_SIZE]) -> SiteRecord {
        SiteRecord {
            site_rel: le32(b, 0) as i32,
            save_rel: le32(b, 4) as i32,
            kind: le16(b, 8),
            flags: le16(b, 10),
            site_len: b[12],
            insn_len: b[13],
            width: b[14],
            reg: b[15],
            base: b[16],
            index: b[17],
            scale: b[18],
            reserved: b[19],
            imm: le32(b, 20) as i32,
            resume_rel: le32(b, 24) as i32,
            origin_rel: le32(b, 28) as i32,
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One chunk found in a table: where its header is and a zero-copy view of its records.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// Offset of the header within the section.
    pub offset: usize,
    pub header: ChunkHeader,
    records: &'a [u8],
}

impl<'a> Chunk<'a> {
    /// Offset within the section of record `i`.
    pub fn record_offset(&self, i: usize) -> usize {
        self.offset + HEADER_SIZE + i * RECORD_SIZE
    }
    pub fn len(&self) -> usize {
        self.header.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }
    pub fn record(&self, i: usize) -> SiteRecord {
        let at = i * RECORD_SIZE;
        SiteRecord::from_bytes(self.records[at..at + RECORD_SIZE].try_into().expect("in bounds"))
    }
    /// `(offset within the section, record)` for every record in the chunk.
    pub fn records(&self) -> impl Iterator<Item = (usize, SiteRecord)> + '_ {
        (0..self.len()).map(move |i| (self.record_offset(i), self.record(i)))
    }
}

/// Iterates the chunks of a [`SITES_SECTION`] image, skipping the zero padding the linker may
/// insert between chunks. Stops at the first error.
pub struct Chunks<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Walk the chunks of a site table given the section's bytes.
pub fn chunks(section: &[u8]) -> Chunks<'_> {
    Chunks { data: section, pos: 0, failed: false }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Result<Chunk<'a>, AbiError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        // Skip alignment padding: whole zero words.
        while self.pos + CHUNK_ALIGN <= self.data.len()
            && self.data[self.pos..self.pos + CHUNK_ALIGN] == [0; CHUNK_ALIGN]
        {
            self.pos += CHUNK_ALIGN;
        }
        if self.pos >= self.data.len() {
            return None;
        }
        let offset = self.pos;
        let err = |e| Some(Err(e));
        let Some(head) = self.data.get(offset..offset + HEADER_SIZE) else {
            self.failed = true;
            return err(AbiError::Truncated { offset });
        };
        let header = ChunkHeader::from_bytes(head.try_into().expect("16 bytes"));
        if header.magic != CHUNK_MAGIC {
            self.failed = true;
            return err(AbiError::BadMagic { offset });
        }
        if header.version != ABI_VERSION {
            self.failed = true;
            return err(AbiError::UnknownVersion { offset, version: header.version });
        }
        if header.record_size as usize != RECORD_SIZE {
            self.failed = true;
            return err(AbiError::BadRecordSize { offset, size: header.record_size });
        }
        let start = offset + HEADER_SIZE;
        let end = (header.count as usize).checked_mul(RECORD_SIZE).and_then(|n| n.checked_add(start));
        let Some(records) = end.and_then(|end| self.data.get(start..end)) else {
            self.failed = true;
            return err(AbiError::Truncated { offset });
        };
        self.pos = start + records.len();
        Some(Ok(Chunk { offset, header, records }))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn kinds_are_unique_and_round_trip() {
        for (i, a) in KINDS.iter().enumerate() {
            assert_eq!(Kind::from_u16(a.kind as u16), Some(a.kind));
            assert_eq!(Kind::from_name(a.name), Some(a.kind));
            assert_eq!(a.kind.name(), a.name);
            for b in &KINDS[i + 1..] {
                assert!((a.kind as u16) < (b.kind as u16), "KINDS must be in numeric order");
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn record_round_trips_and_resolves() {
        let mut r = SiteRecord {
            kind: Kind::Out as u16,
            flags: flags::IMM_PORT | flags::WRITE,
            site_len: 7,
            insn_len: 2,
            width: 1,
            imm: 0xf4,
            ..Default::default()
        };
        let at = 0xffff_ffff_8100_0000u64;
        let to = Resolved {
            site: 0xffff_ffff_8000_1000,
            save: 0xffff_ffff_8200_0000,
            resume: 0xffff_ffff_8000_1007,
            origin: 0xffff_ffff_8000_1000,
        };
        r.set_targets(at, to);
        assert_eq!(r.resolve(at), to);
        assert_eq!(SiteRecord::from_bytes(&r.to_bytes()), r);
    }

    #[test]
    fn field_offsets_match_the_document() {
        let r = SiteRecord {
            site_rel: 0x0101_0101,
            save_rel: 0x0202_0202,
            kind: 0x0303,
            flags: 0x0404,
            site_len: 5,
            insn_len: 6,
            width: 7,
            reg: 8,
            base: 9,
            index: 10,
            scale: 11,
            reserved: 0,
            imm: 0x0c0c_0c0c,
            resume_rel: 0x0d0d_0d0d,
            origin_rel: 0x0e0e_0e0e,
        };
        let b = r.to_bytes();
        let at = |f: usize| b[f];
        assert_eq!(
            [at(field::SITE), at(field::SAVE), at(field::KIND), at(field::FLAGS), at(field::SITE_LEN)],
            [1, 2, 3, 4, 5]
        );
        assert_eq!([at(field::INSN_LEN), at(field::WIDTH), at(field::REG), at(field::BASE)], [6, 7, 8, 9]);
        assert_eq!(
            [at(field::INDEX), at(field::SCALE), at(field::IMM), at(field::RESUME), at(field::ORIGIN)],
            [10, 11, 12, 13, 14]
        );
    }

    #[test]
    fn document_lists_every_kind_with_its_number() {
        let doc = include_str!("../../docs/site-abi.md");
        for k in KINDS {
            let row = std::format!("| {} | `{}` | {} |", k.kind as u16, k.name, k.class.name());
            assert!(doc.contains(&row), "docs/site-abi.md lacks the row {row}");
        }
    }

    #[test]
    fn chunks_skip_padding_and_reject_garbage() {
        let mut table = Vec::new();
        table.extend_from_slice(&ChunkHeader::new(Producer::Assembler, 1).to_bytes());
        table.extend_from_slice(&SiteRecord { kind: 1, ..Default::default() }.to_bytes());
        table.extend_from_slice(&[0; 8]);
        table.extend_from_slice(&ChunkHeader::new(Producer::PostLink, 2).to_bytes());
        table.extend_from_slice(&[0; 2 * RECORD_SIZE]);
        let found: Vec<_> = chunks(&table).map(|c| c.unwrap()).collect();
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].offset, HEADER_SIZE + RECORD_SIZE + 8);
        assert_eq!(found[1].records().count(), 2);
        assert_eq!(found[0].record(0).kind(), Some(Kind::Cli));

        table.truncate(table.len() - 1);
        assert!(matches!(chunks(&table).nth(1), Some(Err(AbiError::Truncated { .. }))));
        assert!(matches!(chunks(&[1; 20]).next(), Some(Err(AbiError::BadMagic { offset: 0 }))));
        assert!(matches!(chunks(&[1, 2, 3, 4, 5]).next(), Some(Err(AbiError::Truncated { offset: 0 }))));
    }
}

//! The runtime's patcher (previrt_runtime::patch) on a table in host memory: saving originals
//! once, routing to the stub, restoring native code, re-patching at any time.
//!
//! Sites are real instructions assembled by iced-x86 with records filled by previrt-rewriter,
//! as the toolchain does; the patcher runs on real memory exactly as in the guest.

use previrt_rewriter::iced_x86::{code_asm::*, Decoder, DecoderOptions, Mnemonic};
use previrt_runtime::backend::{NATIVE, TRACE};
use previrt_runtime::patch::{IndexEntry, Patcher, CALL_LEN};
use previrt_site_abi::{flags, ChunkHeader, Producer, Resolved, HEADER_SIZE, RECORD_SIZE};

struct Table {
    buf: Vec<u8>,
    table: usize,
    len: usize,
    /// (site offset, original bytes, site_len, trap)
    sites: Vec<(usize, Vec<u8>, usize, bool)>,
}

const SCRATCH: usize = 0x400;

/// Sites laid out back to back (original + 0x90 scratch), then save slots, then the table in
/// two chunks (the second after linker-style zero padding).
fn table() -> Table {
    type Emit = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let shapes: [(Emit, usize, bool); 8] = [
        (|a| a.cli(), 5, false),
        (|a| a.out(0xf4, al), 7, false),
        (|a| a.mov(cr3, rax), 8, false),
        (|a| a.wrmsr(), 5, false),
        (|a| a.invlpg(ptr(rdi + rsi * 8 + 0x10)), 9, false),
        (|a| a.sti(), 1, true),  // trap-only: no scratch
        (|a| a.hlt(), 2, false), // too short for a call
        (|a| a.cpuid(), 5, false),
    ];
    let mut buf = vec![0u8; SCRATCH * 4];
    let base = buf.as_ptr() as u64;
    let (mut at, mut save) = (0usize, SCRATCH);
    let table = 2 * SCRATCH;
    let mut sites = Vec::new();
    let mut recs = Vec::new();
    for (i, (emit, site_len, trap)) in shapes.iter().cycle().take(24).enumerate() {
        let mut a = CodeAssembler::new(64).unwrap();
        emit(&mut a).unwrap();
        let bytes = a.assemble(base + at as u64).unwrap();
        let ins = Decoder::with_ip(64, &bytes, base + at as u64, DecoderOptions::NONE).decode();
        let entry = previrt_rewriter::classify(&ins).unwrap();
        let mut r = previrt_rewriter::record::operands(&ins, entry, 64);
        r.site_len = *site_len as u8;
        if *trap {
            r.flags |= flags::TRAP;
        }
        buf[at..at + bytes.len()].copy_from_slice(&bytes);
        buf[at + bytes.len()..at + site_len].fill(0x90);
        // Second chunk starts at record 16.
        let rec_off = table + HEADER_SIZE + i * RECORD_SIZE + if i >= 16 { 8 + HEADER_SIZE } else { 0 };
        let site = base + at as u64;
        r.set_targets(
            base + rec_off as u64,
            Resolved { site, save: base + save as u64, resume: site + *site_len as u64, origin: site },
        );
        recs.push((rec_off, r));
        sites.push((at, bytes.clone(), *site_len, *trap));
        at += site_len;
        save += bytes.len();
    }
    buf[table..table + HEADER_SIZE].copy_from_slice(&ChunkHeader::new(Producer::Assembler, 16).to_bytes());
    let second = table + HEADER_SIZE + 16 * RECORD_SIZE + 8;
    buf[second..second + HEADER_SIZE].copy_from_slice(&ChunkHeader::new(Producer::Assembler, 8).to_bytes());
    for (off, r) in &recs {
        buf[*off..*off + RECORD_SIZE].copy_from_slice(&r.to_bytes());
    }
    let len = second + HEADER_SIZE + 8 * RECORD_SIZE - table;
    Table { buf, table, len, sites }
}

/// Every instruction of `code` is a NOP.
fn all_nops(code: &[u8], ip: u64) {
    for ins in Decoder::with_ip(64, code, ip, DecoderOptions::NONE) {
        assert_eq!(ins.mnemonic(), Mnemonic::Nop, "filler {code:02x?} decodes as {ins}");
    }
}

#[test]
fn trace_routes_native_restores_and_repatch_keeps_the_first_saved_originals() {
    let t = table();
    let base = t.buf.as_ptr() as u64;
    let start = base + t.table as u64;
    let stub = base + 3 * SCRATCH as u64;
    let mut index = vec![IndexEntry::default(); 64];

    // SAFETY (all patcher calls): table, sites and save slots live in t.buf.
    let p = unsafe { Patcher::prepare(start, t.len, &mut index) }.unwrap();
    assert_eq!(p.sites, 24);
    assert!(p.index[..p.sites].windows(2).all(|w| w[0].site < w[1].site), "index sorted by site");
    for (i, (at, orig, len, _)) in t.sites.iter().enumerate() {
        assert_eq!(p.find(base + *at as u64), Some(i));
        if *len > 1 {
            assert_eq!(p.find(base + *at as u64 + 1), None, "only site starts are found");
        }
        let save = unsafe { p.site(&p.index[i]) }.at.save as usize - base as usize;
        assert_eq!(&t.buf[save..save + orig.len()], &orig[..], "save slot {i}");
    }
    for chunk_at in [t.table, t.table + HEADER_SIZE + 16 * RECORD_SIZE + 8] {
        let hdr = ChunkHeader::from_bytes(t.buf[chunk_at..chunk_at + HEADER_SIZE].try_into().unwrap());
        assert_eq!(hdr.state & ChunkHeader::STATE_SAVED, ChunkHeader::STATE_SAVED);
    }

    let stats = unsafe { p.apply(&TRACE, stub) };
    assert_eq!((stats.sites, stats.routed, stats.kept_original), (24, 18, 3));
    for (at, orig, len, _) in &t.sites {
        let code = &t.buf[*at..*at + len];
        let ip = base + *at as u64;
        if *len < CALL_LEN {
            assert_eq!(&code[..orig.len()], &orig[..], "trap-only and short sites keep the instruction");
            all_nops(&code[orig.len()..], ip + orig.len() as u64);
            continue;
        }
        let call = Decoder::with_ip(64, code, ip, DecoderOptions::NONE).decode();
        assert_eq!((call.mnemonic(), call.near_branch64(), call.len()), (Mnemonic::Call, stub, CALL_LEN));
        all_nops(&code[CALL_LEN..], ip + CALL_LEN as u64);
    }

    // A later re-patch (e.g. after migration) prepares again: the state bits say the slots
    // hold the originals, so the calls now in the code are not saved over them.
    let p = unsafe { Patcher::prepare(start, t.len, &mut index) }.unwrap();
    let stats = unsafe { p.apply(&NATIVE, stub) };
    assert_eq!((stats.routed, stats.kept_original), (0, 0));
    for (at, orig, len, _) in &t.sites {
        let code = &t.buf[*at..*at + len];
        assert_eq!(&code[..orig.len()], &orig[..], "original restored at {at:#x}");
        all_nops(&code[orig.len()..], base + (*at + orig.len()) as u64);
    }
    // And back again: any number of switches.
    unsafe { p.apply(&TRACE, stub) };
    unsafe { p.apply(&NATIVE, stub) };
    let first = &t.sites[0];
    assert_eq!(&t.buf[first.0..first.0 + first.1.len()], &first.1[..]);
}

#[test]
fn bad_tables_are_refused() {
    let mut t = table();
    let start = t.buf.as_ptr() as u64 + t.table as u64;
    let mut small = vec![IndexEntry::default(); 10];
    let err = unsafe { Patcher::prepare(start, t.len, &mut small) }.err().expect("index too small");
    assert_eq!(err.to_string(), "more than 10 sites");
    // site_len < insn_len in the first record.
    t.buf[t.table + HEADER_SIZE + 12] = 0;
    let mut index = vec![IndexEntry::default(); 64];
    let err = unsafe { Patcher::prepare(start, t.len, &mut index) }.err().expect("bad record");
    assert!(err.to_string().contains("impossible lengths"), "{err}");
    // Garbage where a chunk header should be.
    t.buf[t.table..t.table + 4].copy_from_slice(b"XXXX");
    let err = unsafe { Patcher::prepare(start, t.len, &mut index) }.err().expect("bad magic");
    assert!(err.to_string().contains("no site chunk header"), "{err}");
}

#[test]
fn native_sti_keeps_its_interrupt_shadow_over_the_next_instruction() {
    use previrt_runtime::backend::Route;
    use previrt_runtime::patch::{encode, Site};
    use previrt_site_abi::{Kind, SiteRecord};
    // `sti` restored last in its site, so the instruction after the site (`hlt`) is in its
    // shadow; any other kind keeps instruction-then-NOPs.
    for (kind, insn, insn_at) in [(Kind::Sti, 0xfbu8, 4usize), (Kind::Cli, 0xfa, 0)] {
        let record = SiteRecord { kind: kind as u16, site_len: 5, insn_len: 1, ..Default::default() };
        let at = Resolved { site: 0x1000, save: 0x2000, resume: 0x1005, origin: 0x1000 };
        let site = Site { record_addr: 0x3000, record, at };
        let mut out = [0u8; 5];
        assert_eq!(encode(&site, &[insn], Route::Original, 0, &mut out), Route::Original);
        assert_eq!(out[insn_at], insn, "{kind:?}: {out:02x?}");
        let nops = if insn_at == 0 { 1..5 } else { 0..4 };
        all_nops(&out[nops.clone()], 0x1000 + nops.start as u64);
    }
}

/// A later pass (a migration's re-patch): INIT sites are left alone, sites both backends route
/// the same way are not written, the others are compared and rewritten; a second identical
/// pass writes nothing.
#[test]
fn repatch_writes_only_changed_sites_and_leaves_init_sites() {
    let mut t = table();
    // The first record (a `cli` with room for a call) lies in an init section.
    let flags_at = t.table + HEADER_SIZE + 10;
    let f = u16::from_le_bytes([t.buf[flags_at], t.buf[flags_at + 1]]) | flags::INIT;
    t.buf[flags_at..flags_at + 2].copy_from_slice(&f.to_le_bytes());
    let base = t.buf.as_ptr() as u64;
    let start = base + t.table as u64;
    let stub = base + 3 * SCRATCH as u64;
    let mut index = vec![IndexEntry::default(); 64];
    // SAFETY (all patcher calls): table, sites and save slots live in t.buf.
    let p = unsafe { Patcher::prepare(start, t.len, &mut index) }.unwrap();
    let boot = unsafe { p.apply(&TRACE, stub) };
    assert_eq!((boot.routed, boot.rewritten), (18, 24), "the boot pass writes every site");

    let s = unsafe { p.repatch_with(&TRACE, true, &NATIVE, &|_| stub) };
    assert_eq!((s.init_left, s.rewritten, s.unchanged), (1, 17, 6), "{s:?}");
    let (at, _, len, _) = &t.sites[0];
    let call = Decoder::with_ip(64, &t.buf[*at..*at + len], base + *at as u64, DecoderOptions::NONE).decode();
    assert_eq!((call.mnemonic(), call.near_branch64()), (Mnemonic::Call, stub), "the INIT site keeps its call");
    for (at, orig, _, _) in &t.sites[1..] {
        assert_eq!(&t.buf[*at..*at + orig.len()], &orig[..], "original restored at {at:#x}");
    }

    let again = unsafe { p.repatch_with(&NATIVE, true, &NATIVE, &|_| stub) };
    assert_eq!((again.rewritten, again.unchanged, again.init_left), (0, 23, 1), "{again:?}");
    // Without the route shortcut (another stub claimed) every site is compared: still none
    // written.
    let compared = unsafe { p.repatch_with(&TRACE, false, &NATIVE, &|_| stub) };
    assert_eq!((compared.rewritten, compared.unchanged), (0, 23), "{compared:?}");
}

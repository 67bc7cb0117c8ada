//! The patcher: walks a loaded `.previrt.sites` table, saves every site's original bytes into
//! its `.previrt.save` slot (once), and rewrites sites for a backend.
//!
//! It works on real memory through raw pointers, both in the guest and in host processes (the
//! tests and `bench/patch` build a table in a buffer and patch it with this same code).

use crate::backend::{Backend, Route};
use previrt_site_abi::{chunks, AbiError, ChunkHeader, Kind, Resolved, SiteRecord, HEADER_SIZE, RECORD_SIZE};

/// Largest site the patcher writes (instruction plus scratch).
pub const MAX_SITE_LEN: usize = 64;
/// Length of the `call rel32` the runtime writes into routed sites.
pub const CALL_LEN: usize = 5;

/// One site of a loaded table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// Address of the record.
    pub record_addr: u64,
    pub record: SiteRecord,
    pub at: Resolved,
}

impl Site {
    /// Where execution continues once the site's instruction is done: `resume`, except in a
    /// post-link trampoline, whose moved instructions after the site still have to run
    /// (`site + site_len`; the trampoline then jumps to `resume`).
    pub fn next(&self) -> u64 {
        match self.record.has(previrt_site_abi::flags::TRAMPOLINE) {
            true => self.at.site + self.record.site_len as u64,
            false => self.at.resume,
        }
    }
}

/// Why a table could not be patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchError {
    Abi(AbiError),
    /// A record whose lengths are impossible (`insn_len` 0 or > 15, `site_len` < `insn_len`
    /// or > [`MAX_SITE_LEN`]).
    BadRecord {
        record_addr: u64,
    },
    /// The index has room for fewer sites than the table holds.
    IndexFull {
        capacity: usize,
    },
}

impl core::fmt::Display for PatchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PatchError::Abi(e) => write!(f, "{e}"),
            PatchError::BadRecord { record_addr } => {
                write!(f, "site record at {record_addr:#x} has impossible lengths")
            }
            PatchError::IndexFull { capacity } => write!(f, "more than {capacity} sites"),
        }
    }
}

/// Site address → record address, sorted by site, for the trace stub's lookup by return
/// address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub site: u64,
    pub record_addr: u64,
}

/// Read a record from memory.
///
/// # Safety
/// `addr` must point at [`RECORD_SIZE`] readable bytes.
pub unsafe fn read_record(addr: u64) -> SiteRecord {
    SiteRecord::from_bytes(&*(addr as *const [u8; RECORD_SIZE]))
}

/// Walk the table `[start, start + len)` in memory and call `f` for every chunk header
/// address and every site.
///
/// # Safety
/// The range must be a readable site table.
pub unsafe fn for_each_site(
    start: u64,
    len: usize,
    mut chunk: impl FnMut(u64, &ChunkHeader),
    mut site: impl FnMut(Site) -> Result<(), PatchError>,
) -> Result<usize, PatchError> {
    let table = core::slice::from_raw_parts(start as *const u8, len);
    let mut n = 0;
    for c in chunks(table) {
        let c = c.map_err(PatchError::Abi)?;
        chunk(start + c.offset as u64, &c.header);
        for (off, record) in c.records() {
            let record_addr = start + off as u64;
            let ok = record.insn_len >= 1
                && record.insn_len <= 15
                && record.site_len >= record.insn_len
                && record.site_len as usize <= MAX_SITE_LEN;
            if !ok {
                return Err(PatchError::BadRecord { record_addr });
            }
            site(Site { record_addr, record, at: record.resolve(record_addr) })?;
            n += 1;
        }
    }
    Ok(n)
}

/// Fill `buf` with the recommended multi-byte NOPs (at most 9 bytes each).
pub fn nop_fill(buf: &mut [u8]) {
    const NOPS: [&[u8]; 9] = [
        &[0x90],
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x00],
        &[0x0f, 0x1f, 0x40, 0x00],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
        &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    ];
    let mut rest = buf;
    while !rest.is_empty() {
        let n = rest.len().min(NOPS.len());
        rest[..n].copy_from_slice(NOPS[n - 1]);
        rest = &mut rest[n..];
    }
}

/// Encode `call target` at `from` into `out[..5]`; None if the target is out of rel32 reach.
pub fn encode_call(from: u64, target: u64, out: &mut [u8]) -> Option<()> {
    let rel = target.wrapping_sub(from.wrapping_add(CALL_LEN as u64)) as i64;
    let rel = i32::try_from(rel).ok()?;
    out[0] = 0xe8;
    out[1..CALL_LEN].copy_from_slice(&rel.to_le_bytes());
    Some(())
}

/// The bytes a site gets for `route`: the saved original plus NOPs, or a call to `stub` plus
/// NOPs. Falls back to the original when the site cannot hold a call (too short, a trap-only
/// site) or the stub is out of reach; returns the route actually taken.
pub fn encode(site: &Site, saved: &[u8], route: Route, stub: u64, out: &mut [u8]) -> Route {
    let len = site.record.site_len as usize;
    let out = &mut out[..len];
    if route == Route::Stub && len >= CALL_LEN && encode_call(site.at.site, stub, out).is_some() {
        nop_fill(&mut out[CALL_LEN..]);
        return Route::Stub;
    }
    let n = site.record.insn_len as usize;
    // A restored `sti` goes last: its one-instruction interrupt shadow must cover what follows
    // the site, or `sti; hlt` could take the wake-up interrupt before reaching the `hlt`.
    let at = if site.record.kind == Kind::Sti as u16 { len - n } else { 0 };
    nop_fill(&mut out[..at]);
    out[at..at + n].copy_from_slice(&saved[..n]);
    nop_fill(&mut out[at + n..]);
    Route::Original
}

/// Whether the code at `at` already is `want`, compared a word at a time (a byte loop would
/// cost ~5 emulated instructions per byte on a host that emulates ring 0).
///
/// # Safety
/// `want.len()` bytes at `at` must be readable.
unsafe fn holds(at: u64, want: &[u8]) -> bool {
    let (words, tail) = want.split_at(want.len() & !7);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    words.chunks_exact(8).enumerate().all(|(i, w)| ((at + 8 * i as u64) as *const u64).read_unaligned() == word(w))
        && tail.iter().enumerate().all(|(i, &b)| ((at + words.len() as u64 + i as u64) as *const u8).read() == b)
}

/// Counts from one patching pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub sites: usize,
    /// Sites now calling the runtime, and sites the backend wanted routed that had to keep
    /// the original instruction (of the sites the pass encoded: a re-patch skips some).
    pub routed: usize,
    pub kept_original: usize,
    /// Sites whose bytes were written / already held what the backend wants (a re-patch
    /// compares before it writes; the boot pass writes every site).
    pub rewritten: usize,
    pub unchanged: usize,
    /// INIT sites a re-patch left alone (their section may be freed: flags::INIT).
    pub init_left: usize,
}

/// A loaded site table and the runtime's index over it.
pub struct Patcher<'a> {
    pub start: u64,
    pub len: usize,
    pub index: &'a mut [IndexEntry],
    /// Number of valid entries in `index` (sorted by site after [`Patcher::prepare`]).
    pub sites: usize,
    /// How many of them are flagged INIT (left alone by every later pass).
    pub init: usize,
}

impl<'a> Patcher<'a> {
    /// Save every site's original bytes (chunks whose state says "saved" are skipped, so this
    /// is safe to call again) and build the sorted index.
    ///
    /// # Safety
    /// The table, the sites and the save slots it names must be mapped and writable.
    pub unsafe fn prepare(start: u64, len: usize, index: &'a mut [IndexEntry]) -> Result<Patcher<'a>, PatchError> {
        let capacity = index.len();
        let (mut n, mut init) = (0, 0);
        let saving = core::cell::Cell::new(false);
        for_each_site(
            start,
            len,
            |hdr_addr, hdr| {
                // The state bit is set before the chunk's records are visited; they are
                // saved in the same pass, before anything reads the slots.
                saving.set(hdr.state & ChunkHeader::STATE_SAVED == 0);
                if saving.get() {
                    let state = (hdr_addr + HEADER_SIZE as u64 - 2) as *mut u16;
                    state.write_unaligned(hdr.state | ChunkHeader::STATE_SAVED);
                }
            },
            |s| {
                if saving.get() {
                    core::ptr::copy_nonoverlapping(
                        s.at.site as *const u8,
                        s.at.save as *mut u8,
                        s.record.insn_len as usize,
                    );
                }
                init += usize::from(s.record.has(previrt_site_abi::flags::INIT));
                let slot = index.get_mut(n).ok_or(PatchError::IndexFull { capacity })?;
                *slot = IndexEntry { site: s.at.site, record_addr: s.record_addr };
                n += 1;
                Ok(())
            },
        )?;
        index[..n].sort_unstable_by_key(|e| e.site);
        Ok(Patcher { start, len, index, sites: n, init })
    }

    /// Rewrite every site for `backend`; routed sites call `stub`. Sites are written with
    /// plain stores: the caller makes code writable and serializes afterwards.
    ///
    /// # Safety
    /// As for [`Patcher::prepare`]; no CPU may be executing inside a site.
    pub unsafe fn apply(&self, backend: &Backend, stub: u64) -> Stats {
        self.apply_with(backend, &|_| stub)
    }

    /// As [`Patcher::apply`], each routed site calling `stub(site)` (a backend may have lean
    /// entries for some kinds).
    ///
    /// # Safety
    /// As for [`Patcher::apply`].
    pub unsafe fn apply_with(&self, backend: &Backend, stub: &dyn Fn(&Site) -> u64) -> Stats {
        self.pass(backend, stub, None)
    }

    /// A later pass (migration, `previrt_repatch`) from the sites as a pass for `from` left
    /// them: as [`Patcher::apply_with`], but sites flagged INIT are left alone (the kernel may
    /// have freed their section), a site both backends route the same way is not even encoded
    /// when that way is the original instruction or, with `same_stub` (`stub` gives the
    /// targets the last pass used), the stub; any other site is compared and written only if
    /// its bytes differ. On an instruction-emulated host every instruction and store costs;
    /// unchanged code also needs no cache or TLB work.
    ///
    /// # Safety
    /// As for [`Patcher::apply`]; the sites hold what the last pass for `from` wrote.
    pub unsafe fn repatch_with(
        &self,
        from: &Backend,
        same_stub: bool,
        backend: &Backend,
        stub: &dyn Fn(&Site) -> u64,
    ) -> Stats {
        self.pass(backend, stub, Some((from, same_stub)))
    }

    unsafe fn pass(&self, backend: &Backend, stub: &dyn Fn(&Site) -> u64, from: Option<(&Backend, bool)>) -> Stats {
        let later = from.is_some();
        let mut stats = Stats { sites: self.sites, ..Default::default() };
        let mut buf = [0u8; MAX_SITE_LEN];
        for e in &self.index[..self.sites] {
            let site = self.site(e);
            if later && site.record.has(previrt_site_abi::flags::INIT) {
                stats.init_left += 1;
                continue;
            }
            let saved = core::slice::from_raw_parts(site.at.save as *const u8, site.record.insn_len as usize);
            let want = (backend.route)(&site.record);
            if from
                .is_some_and(|(b, same_stub)| (want == Route::Original || same_stub) && (b.route)(&site.record) == want)
            {
                stats.unchanged += 1;
                continue;
            }
            // The stub is asked only for a routed site (it may look at the record).
            let target = if want == Route::Stub { stub(&site) } else { 0 };
            let got = encode(&site, saved, want, target, &mut buf);
            match (want, got) {
                (_, Route::Stub) => stats.routed += 1,
                (Route::Stub, Route::Original) => stats.kept_original += 1,
                _ => {}
            }
            let len = site.record.site_len as usize;
            if later && holds(site.at.site, &buf[..len]) {
                stats.unchanged += 1;
                continue;
            }
            core::ptr::copy_nonoverlapping(buf.as_ptr(), site.at.site as *mut u8, len);
            stats.rewritten += 1;
        }
        stats
    }

    /// The site of an index entry.
    ///
    /// # Safety
    /// The entry must come from this patcher's index.
    pub unsafe fn site(&self, e: &IndexEntry) -> Site {
        let record = read_record(e.record_addr);
        Site { record_addr: e.record_addr, record, at: record.resolve(e.record_addr) }
    }

    /// Position in the index of the site starting at `site`.
    pub fn find(&self, site: u64) -> Option<usize> {
        self.index[..self.sites].binary_search_by_key(&site, |e| e.site).ok()
    }
}

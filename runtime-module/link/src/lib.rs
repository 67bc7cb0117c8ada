//! `previrt link`: append the guest runtime to a linked kernel ELF and make it the kernel's
//! entry on every boot path (PVH, multiboot, 64-bit ELF entry).
//!
//! The runtime (built by this crate's build script from `runtime-module/` with the kernel
//! flags, GOT-free and checked for SSE/x87 by disassembly) is linked with the system `ld` at
//! the first page after the kernel's highest loaded byte, with the kernel's virt − phys
//! offset, and appended as a new PT_LOAD. The program header table moves to the end of the
//! file; the PVH note (XEN_ELFNOTE_PHYS32_ENTRY), a multiboot header's `entry_addr` and
//! `e_entry` point at the runtime's entries for those paths, which patch the kernel's sites
//! and then enter the kernel's original entry of the same path.
//! docs/runtime-entry.md has the convention.

pub mod cli;
mod ld;
mod module_hook;
mod multiboot;
mod text_home;
pub mod xen_notes;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::LittleEndian as LE;
use previrt_site_abi::flags;
use std::path::Path;

/// The runtime object, built and checked by build.rs.
pub const RUNTIME_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/previrt-runtime.o"));

/// Backend the runtime uses when the command line names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultBackend {
    Native,
    Trace,
    /// The best backend for the detected platform; today that is `native` everywhere.
    Auto,
}

impl DefaultBackend {
    /// Parse `native`, `trace` or `auto`.
    pub fn parse(s: &str) -> Option<DefaultBackend> {
        [("native", DefaultBackend::Native), ("trace", DefaultBackend::Trace), ("auto", DefaultBackend::Auto)]
            .into_iter()
            .find_map(|(n, b)| (n == s).then_some(b))
    }
    /// The runtime's backend id (previrt_runtime::backend::BACKENDS).
    fn id(self) -> u32 {
        match self {
            DefaultBackend::Native | DefaultBackend::Auto => 0,
            DefaultBackend::Trace => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The input kernel cannot be handled (exit status 2).
    #[error("{0}")]
    Input(String),
    /// The system linker or the file system failed.
    #[error("{0}")]
    Environment(String),
}

/// What `link` did.
#[derive(Debug, Clone)]
pub struct LinkReport {
    /// Runtime placement (virtual and physical), bytes in the file and in memory.
    pub runtime_virt: u64,
    pub runtime_phys: u64,
    pub runtime_file_size: u64,
    pub runtime_mem_size: u64,
    /// Site records found in `.previrt.sites`.
    pub sites: usize,
    /// Per kind name: (all sites, sites in 64-bit code that a routing backend can take over).
    pub kinds: std::collections::BTreeMap<&'static str, (usize, usize)>,
    pub kernel_pvh_entry: u64,
    pub runtime_pvh_entry: u64,
    pub default_backend: DefaultBackend,
    /// The Xen PV notes' addresses, when they were added (docs/xen-pv.md).
    pub xen_pv: Option<xen_notes::XenPv>,
    /// The multiboot header's entry, redirected: (kernel's, runtime's).
    pub multiboot: Option<(u64, u64)>,
    /// The 64-bit ELF entry: (kernel's, runtime's), or None when `e_entry` is the PVH entry
    /// or the kernel is linked at virt != phys (left alone).
    pub elf_entry64: Option<(u64, u64)>,
    /// The runtime and a copy of the site table went into `.text` padding (module
    /// text_home) instead of a segment after the image; the copy's address.
    pub text_resident: Option<u64>,
    /// The module-loading hook (module module_hook): `module_finalize`'s entry and the
    /// address of the instructions moved behind the hook call.
    pub module_hook: Option<(u64, u64)>,
}

/// The facts about a kernel ELF that linking needs.
struct Kernel {
    /// End of the highest loaded physical byte (end of memsz), and virt − phys of the image.
    end_phys: u64,
    delta: u64,
    /// File offset and size of the PVH entry note's descriptor, and its value.
    pvh_desc: (usize, usize),
    pvh_entry: u64,
    sites: (u64, u64),
    site_count: usize,
    kinds: std::collections::BTreeMap<&'static str, (usize, usize)>,
}

fn bad(msg: impl Into<String>) -> LinkError {
    LinkError::Input(msg.into())
}

const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const GIB: u64 = 1 << 30;

fn inspect(data: &[u8]) -> Result<Kernel, LinkError> {
    let hdr = elf::FileHeader64::<LE>::parse(data).map_err(|_| bad("not a 64-bit little-endian ELF file"))?;
    if hdr.e_machine(LE) != elf::EM_X86_64 || hdr.e_type(LE) != elf::ET_EXEC {
        return Err(bad("not an x86-64 executable (ET_EXEC) ELF"));
    }
    let phdrs = hdr.program_headers(LE, data).map_err(|e| bad(format!("bad program headers: {e}")))?;
    if phdrs.iter().any(|p| p.p_type(LE) == elf::PT_PHDR) {
        return Err(bad("kernel has a PT_PHDR segment; previrt link moves the program headers and cannot keep it"));
    }
    let loads: Vec<_> = phdrs.iter().filter(|p| p.p_type(LE) == elf::PT_LOAD && p.p_memsz(LE) > 0).collect();
    let first = loads.first().ok_or_else(|| bad("kernel has no PT_LOAD segment"))?;
    // The image's offset is the first segment's. Others may differ (Linux's zero-based
    // per-CPU segment); placement goes by physical addresses.
    let delta = first.p_vaddr(LE).wrapping_sub(first.p_paddr(LE));
    if delta != 0 && (delta % GIB != 0 || (delta >> 39) & 511 == 0 || (delta >> 30) & 511 > 510) {
        return Err(bad(format!(
            "kernel virt-phys offset {delta:#x} is not supported (needs 0, or 1 GiB aligned outside the low 512 GiB)"
        )));
    }
    let end_phys = loads.iter().map(|p| p.p_paddr(LE) + p.p_memsz(LE)).max().unwrap_or(0);

    let mut pvh = None;
    for p in phdrs.iter().filter(|p| p.p_type(LE) == elf::PT_NOTE) {
        let Ok(Some(mut notes)) = p.notes(LE, data) else { continue };
        while let Ok(Some(n)) = notes.next() {
            if n.name() == b"Xen" && n.n_type(LE).0 == XEN_ELFNOTE_PHYS32_ENTRY {
                let desc = n.desc();
                let off = desc.as_ptr() as usize - data.as_ptr() as usize;
                let value = match desc.len() {
                    4 => u32::from_le_bytes(desc.try_into().unwrap()) as u64,
                    8 => u64::from_le_bytes(desc.try_into().unwrap()),
                    n => return Err(bad(format!("PVH entry note has a {n}-byte value"))),
                };
                pvh = Some(((off, desc.len()), value));
            }
        }
    }
    let (pvh_desc, pvh_entry) =
        pvh.ok_or_else(|| bad("kernel has no PVH entry note (Xen ELF note 18, XEN_ELFNOTE_PHYS32_ENTRY)"))?;

    let (mut sites, mut site_count, mut kinds) = ((0, 0), 0, std::collections::BTreeMap::new());
    if let Ok(sections) = hdr.sections(LE, data) {
        if let Some((_, s)) = sections.section_by_name(LE, previrt_site_abi::SITES_SECTION.as_bytes()) {
            let addr = s.sh_addr(LE);
            let size = s.sh_size(LE);
            let loaded = loads.iter().any(|p| addr >= p.p_vaddr(LE) && addr + size <= p.p_vaddr(LE) + p.p_memsz(LE));
            if !loaded {
                return Err(bad(format!("{} is not inside a loaded segment", previrt_site_abi::SITES_SECTION)));
            }
            let bytes = s.data(LE, data).map_err(|e| bad(format!("cannot read the site table: {e}")))?;
            for c in previrt_site_abi::chunks(bytes) {
                let c = c.map_err(|e| bad(format!("site table: {e}")))?;
                site_count += c.len();
                for (_, r) in c.records() {
                    let name = r.kind().map_or("unknown", |k| k.name());
                    let long = !r.has(flags::CODE32 | flags::CODE16 | flags::TRAP);
                    let e = kinds.entry(name).or_insert((0, 0));
                    e.0 += 1;
                    e.1 += long as usize;
                }
            }
            sites = (addr, addr + size);
        }
    }
    Ok(Kernel { end_phys, delta, pvh_desc, pvh_entry, sites, site_count, kinds })
}

/// The runtime linked at `base`: its load segment's bytes, memory size and entry.
struct LinkedRuntime {
    bytes: Vec<u8>,
    mem_size: u64,
    entry: u64,
    /// `previrt_mb_entry` and `previrt_entry64`.
    mb_entry: u64,
    entry64: u64,
    xen: Option<xen_notes::XenPv>,
    /// `previrt_module_hook` and `previrt_module_hook_tramp`.
    module_hook: (u64, u64),
}

fn link_runtime(p: &ld::Placement) -> Result<LinkedRuntime, LinkError> {
    let env = |e: std::io::Error| LinkError::Environment(e.to_string());
    let dir = tempdir().map_err(env)?;
    let obj = dir.join("previrt-runtime.o");
    let elf_path = dir.join("previrt-runtime.elf");
    std::fs::write(&obj, RUNTIME_OBJECT).map_err(env)?;
    let linked = ld::link_runtime(&obj, &elf_path, p).map_err(LinkError::Environment);
    let data = linked.and_then(|()| std::fs::read(&elf_path).map_err(env));
    let _ = std::fs::remove_dir_all(&dir);
    let data = data?;
    let internal = |m: &str| LinkError::Environment(format!("linked runtime: {m}"));
    let hdr = elf::FileHeader64::<LE>::parse(&*data).map_err(|_| internal("not ELF"))?;
    let phdrs = hdr.program_headers(LE, &*data).map_err(|_| internal("no program headers"))?;
    let load = phdrs.iter().find(|ph| ph.p_type(LE) == elf::PT_LOAD).ok_or_else(|| internal("no load segment"))?;
    if load.p_vaddr(LE) != p.base {
        return Err(internal("load segment not at the requested address"));
    }
    let bytes = load.data(LE, &*data).map_err(|_| internal("segment data"))?.to_vec();
    let sym = |n| xen_notes::symbol(&data, n).ok_or_else(|| internal(&format!("no symbol {n}")));
    Ok(LinkedRuntime {
        bytes,
        mem_size: load.p_memsz(LE),
        entry: hdr.e_entry(LE),
        mb_entry: sym("previrt_mb_entry")?,
        entry64: sym("previrt_entry64")?,
        xen: xen_notes::runtime_symbols(&data),
        module_hook: (sym("previrt_module_hook")?, sym("previrt_module_hook_tramp")?),
    })
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("previrt-link-{}-{:x}", std::process::id(), nanos()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Link the runtime into `input`, writing `output` atomically. `input` is never modified.
/// With `xen`, a kernel that names a 64-bit entry (`kernel_entry64`) also gets the Xen PV
/// notes (module xen_notes).
pub fn link(input: &Path, output: &Path, backend: DefaultBackend, xen: bool) -> Result<LinkReport, LinkError> {
    let data = std::fs::read(input).map_err(|e| bad(format!("cannot read {}: {e}", input.display())))?;
    let k = inspect(&data)?;
    let entry64 = xen_notes::kernel_entry64(&data);
    let mb = multiboot::find(&data).map_err(bad)?;
    let old_entry = elf::FileHeader64::<LE>::parse(&*data).map_err(|_| bad("not ELF"))?.e_entry(LE);
    // `e_entry` that is neither 32-bit entry is 64-bit code (docs/runtime-entry.md); the
    // runtime's 64-bit entry runs on the loader's page tables, so only identity-mapped kernels.
    let redirect64 = old_entry != k.pvh_entry && mb.is_none_or(|h| h.entry as u64 != old_entry) && k.delta == 0;
    let page = 4096u64;
    // Kernels linked high keep only their image mapped (module text_home): the runtime goes
    // into .text padding, after a copy of the site table.
    let home = match k.delta != 0 && mb.is_none() {
        true => Some(text_home::largest_run(&data).ok_or_else(|| bad("no int3 padding in .text for the runtime"))?),
        false => None,
    };
    let block = match home {
        Some(_) => text_home::site_block(&data).map_err(bad)?,
        None => None,
    };
    let table_at = home.map(|r| r.start.div_ceil(16) * 16);
    // Linux's module loader calls the runtime before a module runs (module module_hook).
    let hook = home.and_then(|_| module_hook::find(&data));
    let (base, sites) = match (home, table_at) {
        (Some(_), Some(at)) => {
            let len = block.as_ref().map_or(0, |b| b.bytes.len() as u64);
            let table_len = block.as_ref().map_or(0, |b| b.table_len as u64);
            ((at + len).div_ceil(page) * page, (at, at + table_len))
        }
        _ => ((k.end_phys.div_ceil(page) * page).wrapping_add(k.delta), k.sites),
    };
    let placement = ld::Placement {
        base,
        sites_start: sites.0,
        sites_end: sites.1,
        text_resident: home.is_some(),
        kernel_pvh_entry: k.pvh_entry,
        kernel_mb_entry: mb.map_or(0, |h| h.entry as u64),
        kernel_elf_entry: if redirect64 { old_entry } else { 0 },
        default_backend: backend.id(),
        virt_delta: k.delta,
        kernel_entry64: entry64.unwrap_or(0),
    };
    let rt = link_runtime(&placement)?;
    let phys = base.wrapping_sub(k.delta);
    let entry_phys = rt.entry.wrapping_sub(k.delta);
    if entry_phys > u32::MAX as u64 {
        return Err(bad(format!("runtime would load at physical {phys:#x}, above 4 GiB")));
    }

    // Layout: original file, runtime segment (page aligned), new program header table. With a
    // multiboot header, the runtime goes where that header's loader puts it (module multiboot);
    // in .text padding, the image's own segment loads it (no new segment).
    let (mut out, rt_off, gap) = match (&mb, home) {
        (_, Some(run)) => {
            if base + rt.mem_size > run.end {
                return Err(bad(format!(
                    "the runtime ({} bytes) and site table do not fit the largest .text padding ({} bytes)",
                    rt.mem_size,
                    run.end - run.start
                )));
            }
            let mut out = data.clone();
            if let (Some(b), Some(at)) = (&block, table_at) {
                put(&mut out, run.offset_of(at), &text_home::relocate(b, at).map_err(bad)?);
            }
            let mut image = rt.bytes.clone();
            image.resize(rt.mem_size as usize, 0);
            if let Some(h) = &hook {
                let (call, tramp) = rt.module_hook;
                let (t, j) = module_hook::trampoline(h, tramp, call)
                    .zip(module_hook::entry_jump(h, tramp))
                    .ok_or_else(|| LinkError::Environment("module hook out of rel32 reach of the runtime".into()))?;
                put(&mut image, (tramp - base) as usize, &t);
                put(&mut out, h.file_offset, &j);
            }
            put(&mut out, run.offset_of(base), &image);
            (out, usize::MAX, multiboot::Gap { at: usize::MAX, gap: 0 })
        }
        (Some(h), None) => {
            let r = multiboot::Runtime {
                phys,
                bytes: &rt.bytes,
                mem_size: rt.mem_size,
                entry: rt.mb_entry.wrapping_sub(k.delta),
            };
            multiboot::place_runtime(&data, h, &r).map_err(bad)?
        }
        (None, None) => {
            let mut out = data.clone();
            out.resize(out.len().div_ceil(page as usize) * page as usize, 0);
            let rt_off = out.len();
            out.extend_from_slice(&rt.bytes);
            (out, rt_off, multiboot::Gap { at: usize::MAX, gap: 0 })
        }
    };
    let hdr = elf::FileHeader64::<LE>::parse(&*out).map_err(|_| bad("not ELF"))?;
    let (phoff, phnum, phentsize) = (hdr.e_phoff(LE) as usize, hdr.e_phnum(LE) as usize, hdr.e_phentsize(LE) as usize);
    let old_phdrs = out[phoff..phoff + phnum * phentsize].to_vec();
    let xen_pv = rt.xen.filter(|_| xen && entry64.is_some());
    let notes = xen_pv.map(|x| (out.len() as u64, xen_notes::notes(&x)));
    if let Some((_, n)) = &notes {
        out.extend_from_slice(n);
    }
    out.resize(out.len().div_ceil(8) * 8, 0);
    let new_phoff = out.len();
    out.extend_from_slice(&old_phdrs);
    let segment = rt_off != usize::MAX;
    let mut ph = [0u8; 56];
    put(&mut ph, 0, &elf::PT_LOAD.0.to_le_bytes());
    put(&mut ph, 4, &(elf::PF_R.0 | elf::PF_W.0 | elf::PF_X.0).to_le_bytes());
    put(&mut ph, 8, &(rt_off as u64).to_le_bytes());
    put(&mut ph, 16, &base.to_le_bytes());
    put(&mut ph, 24, &phys.to_le_bytes());
    put(&mut ph, 32, &(rt.bytes.len() as u64).to_le_bytes());
    put(&mut ph, 40, &rt.mem_size.to_le_bytes());
    put(&mut ph, 48, &page.to_le_bytes());
    if segment {
        out.extend_from_slice(&ph[..phentsize.min(56)]);
    }
    if let Some((off, n)) = &notes {
        out.extend_from_slice(&xen_notes::note_phdr(*off, n.len() as u64)[..phentsize.min(56)]);
    }

    // e_phoff (+32), e_phnum (+56); e_entry (+24) keeps the original's address space.
    put(&mut out, 32, &(new_phoff as u64).to_le_bytes());
    put(&mut out, 56, &((phnum + segment as usize + notes.is_some() as usize) as u16).to_le_bytes());
    let entry64 = rt.entry64.wrapping_sub(k.delta);
    let new_entry = match () {
        _ if old_entry == k.pvh_entry => entry_phys,
        _ if redirect64 => entry64,
        _ => old_entry,
    };
    put(&mut out, 24, &new_entry.to_le_bytes());
    let (desc_off, desc_len) = (gap.moved(k.pvh_desc.0), k.pvh_desc.1);
    put(&mut out, desc_off, &entry_phys.to_le_bytes()[..desc_len]);

    previrt_atomic_write::write_with(output, &out, previrt_atomic_write::Options { mode: Some(0o755), sync: false })
        .map_err(|e| LinkError::Environment(format!("cannot write {}: {e}", output.display())))?;
    Ok(LinkReport {
        runtime_virt: base,
        runtime_phys: phys,
        runtime_file_size: rt.bytes.len() as u64,
        runtime_mem_size: rt.mem_size,
        sites: k.site_count,
        kinds: k.kinds,
        kernel_pvh_entry: k.pvh_entry,
        runtime_pvh_entry: entry_phys,
        default_backend: backend,
        xen_pv,
        multiboot: mb.map(|h| (h.entry as u64, rt.mb_entry.wrapping_sub(k.delta))),
        elf_entry64: redirect64.then_some((old_entry, entry64)),
        text_resident: table_at,
        module_hook: hook.map(|h| (h.function, h.at)),
    })
}

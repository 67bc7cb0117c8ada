//! Kernel loading and the initial vCPU state for each boot protocol.
//!
//! Entry selection, first match wins: a Linux bzImage ("HdrS" at 0x202); an ELF with a PVH
//! note (Xen note type 18, 32-bit protected mode, %ebx = hvm_start_info); an ELF with a
//! multiboot v1 header (32-bit, %eax = 0x2BADB002, %ebx = multiboot info); any other ELF64
//! (long mode on the VMM's identity page tables, %rdi = hvm_start_info).

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::KernelLoader;
use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::*;

/// Input the user gave us that cannot boot; `previrt run` exits with status 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for BadInput {}

fn bad<T>(msg: impl Into<String>) -> Result<T, BadInput> {
    Err(BadInput(msg.into()))
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Pvh,
    Multiboot,
    Elf64,
    #[value(name = "bzimage")]
    LinuxBzImage,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Multiboot => "multiboot",
            Protocol::Elf64 => "elf64",
            Protocol::LinuxBzImage => "bzimage",
        }
    }
}

/// Xen ELF notes the Xen personality cares about.
#[derive(Debug, Default, Clone)]
pub struct XenNotes {
    pub phys32_entry: Option<u64>,
    pub hypercall_page: Option<u64>,
}

/// A loaded kernel.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub protocol: Protocol,
    pub entry: u64,
    pub kernel_end: u64,
    pub notes: XenNotes,
}

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
const MULTIBOOT_BOOT_MAGIC: u64 = 0x2bad_b002;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const XEN_ELFNOTE_HYPERCALL_PAGE: u32 = 2;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, gpa: u64, v: T) -> Result<(), BadInput> {
    mem.write_obj(v, GuestAddress(gpa)).or_else(|_| bad(format!("guest memory too small for boot data at {gpa:#x}")))
}

fn write_bytes(mem: &GuestMemoryMmap, gpa: u64, b: &[u8]) -> Result<(), BadInput> {
    mem.write_slice(b, GuestAddress(gpa))
        .or_else(|_| bad(format!("{} bytes at {gpa:#x} do not fit in guest memory", b.len())))
}

/// Load `image` into guest memory, entering it by `force` if given (and offered by the
/// image), else by the first protocol it offers in the order above.
pub fn load_kernel(mem: &GuestMemoryMmap, image: &[u8], force: Option<Protocol>) -> Result<Loaded, BadInput> {
    if image.len() > 0x206 && &image[0x202..0x206] == b"HdrS" {
        if force.is_some_and(|p| p != Protocol::LinuxBzImage) {
            return bad("a bzImage is entered only through the Linux 64-bit boot protocol");
        }
        return load_bzimage(mem, image);
    }
    if image.len() < 5 || &image[..4] != b"\x7fELF" {
        return bad("kernel is neither an ELF file nor a Linux bzImage");
    }
    match image[4] {
        1 => load_elf::<elf::FileHeader32<Endianness>>(mem, image, force),
        2 => load_elf::<elf::FileHeader64<Endianness>>(mem, image, force),
        c => bad(format!("ELF class {c} is not supported")),
    }
}

/// The multiboot v1 header, if any: its entry (the a.out-kludge `entry_addr` when flag 16 is
/// set, else None meaning the ELF entry).
fn multiboot_header(image: &[u8]) -> Option<Option<u64>> {
    // The header is 4-byte aligned within the first 8 KiB; magic + flags + checksum == 0.
    let word = |i: usize| image.get(i..i + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let at = (0..image.len().min(8192)).step_by(4).find(|&i| {
        matches!((word(i), word(i + 4), word(i + 8)), (Some(m), Some(f), Some(c))
            if m == MULTIBOOT_MAGIC && m.wrapping_add(f).wrapping_add(c) == 0)
    })?;
    const AOUT_KLUDGE: u32 = 1 << 16;
    let flags = word(at + 4)?;
    Some(if flags & AOUT_KLUDGE != 0 { word(at + 28).map(u64::from) } else { None })
}

fn load_elf<H: FileHeader<Endian = Endianness>>(
    mem: &GuestMemoryMmap,
    image: &[u8],
    force: Option<Protocol>,
) -> Result<Loaded, BadInput> {
    let hdr = H::parse(image).or_else(|e| bad(format!("bad ELF header: {e}")))?;
    let endian = hdr.endian().or_else(|e| bad(format!("bad ELF header: {e}")))?;
    if hdr.e_machine(endian) != elf::EM_X86_64 && hdr.e_machine(endian) != elf::EM_386 {
        return bad("ELF is not for x86");
    }
    let phdrs = hdr.program_headers(endian, image).or_else(|e| bad(format!("bad ELF program headers: {e}")))?;
    let mut notes = XenNotes::default();
    let mut kernel_end = 0u64;
    for ph in phdrs {
        match ph.p_type(endian) {
            elf::PT_LOAD => {
                let paddr: u64 = ph.p_paddr(endian).into();
                let memsz: u64 = ph.p_memsz(endian).into();
                let data = ph.data(endian, image).or_else(|_| bad("ELF segment outside the file"))?;
                if (data.len() as u64) > memsz {
                    return bad("ELF segment has filesz > memsz");
                }
                let end = paddr.checked_add(memsz).filter(|&e| mem.address_in_range(GuestAddress(e.saturating_sub(1))));
                let Some(end) = end else {
                    return bad(format!(
                        "ELF segment at {paddr:#x}+{memsz:#x} does not fit in guest memory (try --mem)"
                    ));
                };
                write_bytes(mem, paddr, data)?;
                // Guest memory starts zeroed, but a segment may overlap the VMM's boot data.
                let zeros = vec![0u8; (memsz - data.len() as u64) as usize];
                write_bytes(mem, paddr + data.len() as u64, &zeros)?;
                kernel_end = kernel_end.max(end);
            }
            elf::PT_NOTE => {
                let Ok(Some(mut it)) = ph.notes(endian, image) else { return bad("malformed ELF note segment") };
                while let Ok(Some(note)) = it.next() {
                    if note.name() != b"Xen" {
                        continue;
                    }
                    let desc = note.desc();
                    let val = match desc.len() {
                        4 => u32::from_le_bytes(desc.try_into().unwrap()) as u64,
                        8 => u64::from_le_bytes(desc.try_into().unwrap()),
                        _ => continue,
                    };
                    match note.n_type(endian).0 {
                        XEN_ELFNOTE_PHYS32_ENTRY => notes.phys32_entry = Some(val),
                        XEN_ELFNOTE_HYPERCALL_PAGE => notes.hypercall_page = Some(val),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if kernel_end == 0 {
        return bad("ELF has no loadable segment");
    }
    let e_entry: u64 = hdr.e_entry(endian).into();
    let offered = [
        notes.phys32_entry.map(|e| (Protocol::Pvh, e)),
        multiboot_header(image).map(|e| (Protocol::Multiboot, e.unwrap_or(e_entry))),
        hdr.is_class_64().then_some((Protocol::Elf64, e_entry)),
    ];
    let mut offered = offered.into_iter().flatten();
    let (protocol, entry) = match force {
        None => offered.next(),
        Some(p) => offered.find(|(o, _)| *o == p),
    }
    .ok_or_else(|| match force {
        Some(p) => BadInput(format!("kernel does not offer the {} entry", p.name())),
        None => BadInput("32-bit ELF without a PVH note or multiboot header: no known entry".into()),
    })?;
    Ok(Loaded { protocol, entry, kernel_end, notes })
}

fn load_bzimage(mem: &GuestMemoryMmap, image: &[u8]) -> Result<Loaded, BadInput> {
    let mut cur = std::io::Cursor::new(image);
    let r = linux_loader::loader::BzImage::load(mem, None, &mut cur, Some(GuestAddress(HIGH_START)))
        .or_else(|e| bad(format!("cannot load bzImage: {e}")))?;
    let Some(hdr) = r.setup_header else { return bad("bzImage without setup header") };
    let version = hdr.version;
    if version < 0x020c {
        return bad(format!("bzImage boot protocol {version:#x} is older than 2.12 (no 64-bit entry)"));
    }
    write(mem, ZERO_PAGE, boot_params { hdr, ..Default::default() })?;
    Ok(Loaded {
        protocol: Protocol::LinuxBzImage,
        entry: r.kernel_load.0 + 0x200,
        kernel_end: r.kernel_end,
        notes: XenNotes::default(),
    })
}

/// E820-style RAM map shared by every protocol: (start, length, type 1 = RAM / 2 = reserved).
pub fn memory_map(mem_size: u64) -> [(u64, u64, u32); 3] {
    [(0, LOW_END, 1), (LOW_END, HIGH_START - LOW_END, 2), (HIGH_START, mem_size - HIGH_START, 1)]
}

/// Place the command line, the initrd and the protocol's boot-info structure.
/// `start_flags` goes to hvm_start_info.flags (Xen's SIF_* bits).
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    k: &Loaded,
    cmdline: &str,
    initrd: Option<&[u8]>,
    start_flags: u32,
) -> Result<(), BadInput> {
    if cmdline.len() >= CMDLINE_MAX {
        return bad(format!("command line longer than {} bytes", CMDLINE_MAX - 1));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    write_bytes(mem, CMDLINE, &c)?;
    let initrd_at = match initrd {
        None => None,
        Some(d) => {
            let addr = mem_size.saturating_sub(d.len() as u64) & !0xfff;
            if addr < k.kernel_end.max(HIGH_START) {
                return bad(format!("initrd of {} bytes does not fit above the kernel (try a larger --mem)", d.len()));
            }
            write_bytes(mem, addr, d)?;
            Some((addr, d.len() as u64))
        }
    };
    let map = memory_map(mem_size);
    match k.protocol {
        Protocol::Pvh | Protocol::Elf64 => {
            for (i, &(addr, size, type_)) in map.iter().enumerate() {
                write(mem, MEMMAP + 24 * i as u64, hvm_memmap_table_entry { addr, size, type_, reserved: 0 })?;
            }
            if let Some((paddr, size)) = initrd_at {
                write(mem, MODLIST, hvm_modlist_entry { paddr, size, cmdline_paddr: 0, reserved: 0 })?;
            }
            let si = hvm_start_info {
                magic: PVH_START_MAGIC,
                version: 1,
                flags: start_flags,
                nr_modules: initrd_at.is_some() as u32,
                modlist_paddr: if initrd_at.is_some() { MODLIST } else { 0 },
                cmdline_paddr: CMDLINE,
                memmap_paddr: MEMMAP,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            write(mem, START_INFO, si)
        }
        Protocol::Multiboot => write_multiboot_info(mem, mem_size, &map, initrd_at),
        Protocol::LinuxBzImage => {
            let mut bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).or_else(|_| bad("zero page"))?;
            bp.hdr.type_of_loader = 0xff;
            bp.hdr.cmd_line_ptr = CMDLINE as u32;
            bp.hdr.cmdline_size = c.len() as u32;
            bp.hdr.loadflags |= 0x01; // LOADED_HIGH
            if let Some((a, s)) = initrd_at {
                bp.hdr.ramdisk_image = a as u32;
                bp.hdr.ramdisk_size = s as u32;
            }
            for (i, &(addr, size, type_)) in map.iter().enumerate() {
                bp.e820_table[i].addr = addr;
                bp.e820_table[i].size = size;
                bp.e820_table[i].r#type = type_;
            }
            bp.e820_entries = map.len() as u8;
            write(mem, ZERO_PAGE, bp)
        }
    }
}

/// Multiboot v1 info at START_INFO: flags MEM | CMDLINE | MODS | MMAP.
fn write_multiboot_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BadInput> {
    let mut info = [0u32; 13];
    info[0] = 1 | 4 | 8 | 64;
    info[1] = (LOW_END / 1024) as u32;
    info[2] = ((mem_size - HIGH_START) / 1024) as u32;
    info[4] = CMDLINE as u32;
    if let Some((a, s)) = initrd {
        info[5] = 1;
        info[6] = MODLIST as u32;
        let m: [u32; 4] = [a as u32, (a + s) as u32, 0, 0];
        write(mem, MODLIST, m)?;
    }
    let mut mmap = Vec::new();
    for &(addr, len, ty) in map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&addr.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&ty.to_le_bytes());
    }
    info[11] = mmap.len() as u32;
    info[12] = MEMMAP as u32;
    write_bytes(mem, MEMMAP, &mmap)?;
    write(mem, START_INFO, info)
}

/// Code/data segments in the VMM's GDT, by selector. Data-driven: the same table fills the
/// GDT in memory and the hidden parts of the segment registers.
const fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}
const CODE32: kvm_segment = seg(0x08, 0xb, 0, 1);
const CODE64: kvm_segment = seg(0x10, 0xb, 1, 0);
const DATA: kvm_segment = seg(0x18, 0x3, 0, 1);
const TSS_SEG: kvm_segment = kvm_segment {
    base: TSS,
    limit: 0x67,
    selector: 0x20,
    type_: 0xb,
    present: 1,
    dpl: 0,
    db: 0,
    s: 0,
    l: 0,
    g: 0,
    avl: 0,
    unusable: 0,
    padding: 0,
};

fn descriptor(s: &kvm_segment) -> u64 {
    let base = s.base;
    let limit = if s.g == 1 { s.limit >> 12 } else { s.limit };
    let access = (s.type_ as u64) | (s.s as u64) << 4 | (s.dpl as u64) << 5 | (s.present as u64) << 7;
    let flags = (s.avl as u64) | (s.l as u64) << 1 | (s.db as u64) << 2 | (s.g as u64) << 3;
    (limit as u64 & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit as u64 >> 16) & 0xf) << 48
        | flags << 52
        | ((base >> 24) & 0xff) << 56
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT and, for long-mode entries, identity page tables (4 GiB, 2 MiB pages, P|RW|U).
fn write_tables(mem: &GuestMemoryMmap) -> Result<(), BadInput> {
    let gdt: [u64; 5] = [0, descriptor(&CODE32), descriptor(&CODE64), descriptor(&DATA), descriptor(&TSS_SEG)];
    write(mem, GDT, gdt)?;
    const P_RW_U: u64 = 0x7;
    write(mem, PML4, PDPT | P_RW_U)?;
    for i in 0..4u64 {
        write(mem, PDPT + 8 * i, (PD + 0x1000 * i) | P_RW_U)?;
    }
    let pds: Vec<u8> = (0..2048u64).flat_map(|i| ((i << 21) | P_RW_U | 0x80).to_le_bytes()).collect();
    write_bytes(mem, PD, &pds)
}

/// Registers and segment state for entering `k`.
pub fn initial_state(
    mem: &GuestMemoryMmap,
    k: &Loaded,
    mut sregs: kvm_sregs,
) -> Result<(kvm_regs, kvm_sregs), BadInput> {
    write_tables(mem)?;
    let mut regs = kvm_regs { rflags: 2, rip: k.entry, ..Default::default() };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.tr = TSS_SEG;
    sregs.ldt = kvm_segment { selector: 0, type_: 2, present: 1, limit: 0xffff, ..Default::default() };
    let long = matches!(k.protocol, Protocol::Elf64 | Protocol::LinuxBzImage);
    sregs.cs = if long { CODE64 } else { CODE32 };
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *s = DATA;
    }
    if long {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
        sregs.cr3 = PML4;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        regs.rsp = STACK_TOP;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    match k.protocol {
        Protocol::Pvh => regs.rbx = START_INFO,
        Protocol::Multiboot => {
            regs.rax = MULTIBOOT_BOOT_MAGIC;
            regs.rbx = START_INFO;
        }
        Protocol::Elf64 => regs.rdi = START_INFO,
        Protocol::LinuxBzImage => regs.rsi = ZERO_PAGE,
    }
    Ok((regs, sregs))
}

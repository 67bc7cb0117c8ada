//! Site tables: a hand-written `.s` emits `.previrt.sites` chunks with `.long 1f - .`
//! directives; the reader resolves them in the relocatable object (through
//! `.rela.previrt.sites`) and in a linked image (through section addresses), and coverage
//! gives every sensitive instruction a verdict.

mod support;

use previrt_rewriter::elf::Elf;
use previrt_rewriter::scan::scan_elf;
use previrt_rewriter::sites::{self, Reason, Target};
use previrt_site_abi::{Kind, Producer};

/// One record: site label, kind number, flags, site_len, insn_len, resume label.
fn record(site: &str, kind: Kind, site_len: u8, insn_len: u8, resume: &str) -> String {
    format!(
        "\t.long {site} - .\n\t.long 0\n\t.short {}, 0\n\t.byte {site_len}, {insn_len}, 0, 0\n\t.byte 0, 0, 0, 0\n\t.long 0\n\t.long {resume} - .\n\t.long {site} - .\n",
        kind as u16
    )
}

fn chunk(producer: Producer, records: &[String]) -> String {
    let mut s = format!(
        "\t.pushsection .previrt.sites,\"a\",@progbits\n\t.balign 4\n\t.long 0x54535650\n\t.short 1, 32\n\t.long {}\n\t.short {}, 0\n",
        records.len(),
        producer as u16
    );
    for r in records {
        s += r;
    }
    s += "\t.popsection\n";
    s
}

/// Object A: covered cli (local label), covered out (global symbol), a site of the wrong kind,
/// an uncovered sti, an uncovered rdtsc, an instruction inside a site.
fn source_a() -> String {
    let mut s = String::from(".text\n.globl _start\n_start:\n");
    s += ".Lcli: cli\n\tnop; nop; nop; nop\n.Lcli_end:\n";
    s += ".globl port_site\nport_site: out %al,$0x80\n\tnop; nop; nop\n.Lout_end:\n";
    s += ".Lcr3: mov %rax,%cr3\n\tnop; nop\n.Lcr3_end:\n";
    s += "\tsti\n";
    s += "\trdtsc\n";
    s += ".Lwide: nop\n\thlt\n\tnop; nop; nop; nop\n.Lwide_end:\n";
    s += "\tret\n";
    s += &chunk(
        Producer::Assembler,
        &[
            record(".Lcli", Kind::Cli, 5, 1, ".Lcli_end"),
            record("port_site", Kind::Out, 5, 2, ".Lout_end"),
            record(".Lcr3", Kind::Cli, 5, 3, ".Lcr3_end"),
            record(".Lwide", Kind::Hlt, 6, 1, ".Lwide_end"),
        ],
    );
    s
}

/// Object B: a second chunk, in another section (.init.text), so a link concatenates chunks.
fn source_b() -> String {
    let mut s = String::from(".section .init.text,\"ax\",@progbits\n.globl init_fn\ninit_fn:\n");
    s += "1: wrmsr\n\tnop; nop; nop\n2:\n\tret\n";
    s += &chunk(Producer::Assembler, &[record("1b", Kind::Wrmsr, 5, 2, "2b")]);
    s
}

fn check(path: &std::path::Path, linked: bool) {
    let data = std::fs::read(path).unwrap();
    let elf = Elf::parse(&data).unwrap();
    assert_eq!(elf.elf_type.is_linked(), linked);
    let table = sites::read(&elf).unwrap().expect("file has .previrt.sites");
    let text = elf.section_by_name(".text").unwrap().index;
    let init = elf.section_by_name(".init.text").map(|s| s.index);

    let mut sites: Vec<_> = table.sites.iter().collect();
    sites.sort_by_key(|s| s.site.section_offset());
    type SiteKey = (Option<(usize, u64)>, Option<Kind>);
    let targets: Vec<SiteKey> = sites.iter().map(|s| (s.site.section_offset(), s.kind())).collect();
    let mut want = vec![
        (Some((text, 0)), Some(Kind::Cli)),
        (Some((text, 5)), Some(Kind::Out)),
        (Some((text, 10)), Some(Kind::Cli)),
        (Some((text, 18)), Some(Kind::Hlt)),
    ];
    if let Some(init) = init {
        want.push((Some((init, 0)), Some(Kind::Wrmsr)));
    }
    want.sort();
    assert_eq!(targets, want);
    // resume = site + site_len, origin = site, for every record.
    for s in &table.sites {
        let (sec, off) = s.site.section_offset().unwrap();
        assert_eq!(s.resume, Target::Section { section: sec, offset: off + s.record.site_len as u64 });
        assert_eq!(s.origin, s.site);
        assert_eq!(s.producer, Producer::Assembler);
        if linked {
            let addr = s.site_address.unwrap();
            assert_eq!(addr, elf.sections[sec].addr + off);
        }
    }

    let hits = scan_elf(&elf);
    let cov = sites::coverage(&hits, &table);
    let mut verdicts: Vec<(usize, u64, &str, Option<Reason>)> = hits
        .iter()
        .map(|h| {
            let r = cov.uncovered.iter().find(|u| u.section == h.section && u.offset == h.offset).map(|u| u.reason);
            (h.section, h.offset, h.entry.name(), r)
        })
        .collect();
    verdicts.sort();
    let mut want = vec![
        (text, 0, "cli", None),
        (text, 5, "out", None),
        (text, 10, "mov_cr", Some(Reason::KindMismatch)),
        (text, 15, "sti", Some(Reason::NoSite)),
        (text, 16, "rdtsc", Some(Reason::NotPatchedByDefault)),
        (text, 19, "hlt", Some(Reason::InsideSite)),
    ];
    if let Some(init) = init {
        want.push((init, 0, "wrmsr", None));
    }
    want.sort();
    assert_eq!(verdicts, want);
    assert_eq!(cov.total, hits.len());
    assert_eq!(cov.covered, if init.is_some() { 3 } else { 2 });
    assert_eq!(cov.covered + cov.uncovered.len(), cov.total);
    assert_eq!(cov.orphan_sites, 1, "the site at .Lwide starts with a nop");
}

#[test]
fn relocatable_object_sites_resolve_through_relocations() {
    let dir = support::scratch("sites-rel");
    let a = support::assemble(&dir, "a", &source_a(), &["--64"]);
    check(&a, false);
    // The global-symbol record really goes through a relocation against `port_site`.
    let data = std::fs::read(&a).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let sec = elf.section_by_name(".previrt.sites").unwrap().index;
    let relocs = previrt_rewriter::elf::relocations_for(&elf, sec).unwrap();
    assert!(relocs.iter().all(|r| r.1 == 2), "only R_X86_64_PC32 expected: {relocs:?}");
    assert!(relocs.len() >= 8);
}

#[test]
fn linked_image_sites_resolve_through_addresses() {
    let dir = support::scratch("sites-exec");
    let a = support::assemble(&dir, "a", &source_a(), &["--64"]);
    let b = support::assemble(&dir, "b", &source_b(), &["--64"]);
    let exe = support::link(&dir, "image", &[&a, &b], &["-static", "-e", "_start"]);
    check(&exe, true);
    // Two chunks, concatenated by the linker.
    let data = std::fs::read(&exe).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let table = sites::read(&elf).unwrap().unwrap();
    let chunks: std::collections::BTreeSet<usize> = table.sites.iter().map(|s| s.chunk_offset).collect();
    assert_eq!(chunks.len(), 2);
}

#[test]
fn undefined_symbol_targets_and_no_table() {
    let dir = support::scratch("sites-undef");
    let mut src = String::from(".text\n\tnop\n");
    src += &chunk(Producer::PostLink, &[record("elsewhere", Kind::Hlt, 5, 1, "elsewhere")]);
    let o = support::assemble(&dir, "u", &src, &["--64"]);
    let data = std::fs::read(&o).unwrap();
    let elf = Elf::parse(&data).unwrap();
    let t = sites::read(&elf).unwrap().unwrap();
    assert_eq!(t.sites.len(), 1);
    assert_eq!(t.sites[0].site, Target::Symbol { name: "elsewhere".into(), addend: 0 });
    assert_eq!(t.sites[0].producer, Producer::PostLink);

    let plain = support::assemble(&dir, "plain", ".text\n\tcli\n", &["--64"]);
    assert!(sites::check_object(&std::fs::read(&plain).unwrap()).unwrap().is_none());
}

#[test]
fn corrupt_table_is_an_error() {
    let dir = support::scratch("sites-bad");
    let src = ".text\n\tcli\n\t.pushsection .previrt.sites,\"a\"\n\t.long 0x54535650\n\t.short 7, 32\n\t.long 0\n\t.short 1, 0\n\t.popsection\n";
    let o = support::assemble(&dir, "bad", src, &["--64"]);
    let err = sites::check_object(&std::fs::read(&o).unwrap()).unwrap_err();
    assert!(err.to_string().contains("unknown ABI version 7"), "{err}");
}

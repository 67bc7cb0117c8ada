//! Mutated and truncated ELF files fed to the reader, the scanner, the site-table reader and
//! the report builder: errors, never panics. A seeded RNG keeps runs reproducible; set
//! `PREVIRT_FUZZ_ITERS` for a longer run.

mod support;

use previrt_rewriter::cli::report_bytes;
use previrt_rewriter::elf::Elf;
use previrt_rewriter::scan::scan_elf;
use previrt_rewriter::sites;

/// xorshift64*: small, seeded, good enough to pick bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn exercise(data: &[u8]) -> Result<(), String> {
    let elf = Elf::parse(data).map_err(|e| e.to_string())?;
    let hits = scan_elf(&elf);
    for h in hits.iter().take(64) {
        let _ = elf.function_at(h.section, h.offset);
        let _ = h.att();
        let _ = h.record(&elf.sections[h.section].name);
    }
    if let Ok(Some(t)) = sites::read(&elf) {
        let _ = sites::coverage(&hits, &t);
    }
    report_bytes("fuzz", data, true).map(|_| ())
}

fn samples() -> Vec<(String, Vec<u8>)> {
    let dir = support::scratch("fuzz");
    let src = "
.text
.globl f
f:
1:  cli
    nop; nop; nop; nop
2:  out %al,$0x80
    mov %rax,%cr3
    lgdt gdt(%rip)
    rep outsb
    call g
    ret
.section .text32,\"ax\",@progbits
.code32
    pushfl
    ljmp $0x10,$0
.code64
.data
gdt: .quad 0,0
.pushsection .previrt.sites,\"a\",@progbits
    .long 0x54535650
    .short 1, 32
    .long 1
    .short 1, 0
    .long 1b - .
    .long 0
    .short 1, 1
    .byte 5, 1, 0, 0, 0, 0, 0, 0
    .long 0
    .long 2b - .
    .long 1b - .
.popsection
";
    let o = support::assemble(&dir, "sample", src, &["--64"]);
    let exe = support::link(&dir, "sample.exe", &[&o], &["-static", "-e", "f", "--unresolved-symbols=ignore-all"]);
    let mut v = vec![
        ("sample.o".to_string(), std::fs::read(&o).unwrap()),
        ("sample.exe".to_string(), std::fs::read(&exe).unwrap()),
    ];
    // A real dynamic executable from the machine when it is small enough to iterate over.
    for p in ["/usr/bin/true", "/bin/true"] {
        if let Ok(d) = std::fs::read(p) {
            if d.len() < 256 * 1024 && Elf::parse(&d).is_ok() {
                v.push((p.to_string(), d));
                break;
            }
        }
    }
    v
}

#[test]
fn mutated_and_truncated_elf_never_panics() {
    let iters: usize = std::env::var("PREVIRT_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(1500);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut errors = 0usize;
    for (name, orig) in samples() {
        assert!(exercise(&orig).is_ok(), "{name}: the unmodified file must scan");
        // Where the structure lives: ELF header, program headers, section headers.
        let shoff = u64::from_le_bytes(orig[0x28..0x30].try_into().unwrap()) as usize;
        for i in 0..iters {
            let mut d = orig.clone();
            match i % 4 {
                // Truncate anywhere.
                0 => d.truncate(rng.below(orig.len())),
                // Flip bytes anywhere.
                1 => {
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(d.len());
                        d[at] ^= 1 << rng.below(8);
                    }
                }
                // Overwrite header / section-header fields with random words.
                2 => {
                    for _ in 0..1 + rng.below(4) {
                        let at = if rng.below(2) == 0 { rng.below(64) } else { shoff + rng.below(d.len() - shoff) };
                        let v = rng.next().to_le_bytes();
                        let n = [1, 2, 4, 8][rng.below(4)];
                        for (k, byte) in v.iter().enumerate().take(n) {
                            if let Some(b) = d.get_mut(at + k) {
                                *b = *byte;
                            }
                        }
                    }
                }
                // Both: a flip and a truncation.
                _ => {
                    let at = rng.below(d.len());
                    d[at] = rng.next() as u8;
                    d.truncate(orig.len() - rng.below(orig.len() / 4 + 1));
                }
            }
            let r = std::panic::catch_unwind(|| exercise(&d));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(_)) => errors += 1,
                Err(_) => {
                    let path = std::env::temp_dir().join(format!("previrt-fuzz-crash-{i}.bin"));
                    std::fs::write(&path, &d).unwrap();
                    panic!("{name}: mutation {i} panicked; input saved to {}", path.display());
                }
            }
        }
    }
    assert!(errors > 0, "mutations should produce some errors");
}

#[test]
fn every_truncation_of_a_small_object_is_an_error_or_ok() {
    let (_, orig) = samples().remove(0);
    for len in 0..orig.len() {
        match Elf::parse(&orig[..len]) {
            Ok(elf) => {
                let _ = scan_elf(&elf);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

//! Seeded random-input fuzzing of the hypercall dispatchers (previrt and Xen personalities):
//! random hypercall numbers, arguments, MSR writes and shared-page contents. The dispatchers
//! must never panic and must answer with an error code or a clear stop; arguments pointing
//! past the 1 MiB of guest RAM must come back as errors (every access is bounds-checked).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use previrt_hv_abi::{self as abi, hc};
use previrt_vmm::devices::ConsoleOut;
use previrt_vmm::pv::{Outcome, Pv};
use previrt_vmm::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use previrt_vmm::xen::{Version, Xen};

/// xorshift64*: deterministic, so a failure names its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Values that hit edges more often than uniform ones: small, near the RAM size, huge.
    fn arg(&mut self, ram: u64) -> u64 {
        match self.next() % 6 {
            0 => self.next() % 16,
            1 => ram - (self.next() % 8192),
            2 => self.next() % ram,
            3 => (self.next() % ram) & !0xfff,
            4 => u64::MAX - (self.next() % 4),
            _ => self.next(),
        }
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RAM: u64 = 1 << 20;
const ITERATIONS: usize = 20_000;

#[test]
fn previrt_dispatcher_survives_random_input() {
    let disk_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmm-fuzz-disk.img");
    std::fs::write(&disk_path, vec![0u8; 64 * 512]).unwrap();
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let disk = std::fs::File::options().read(true).write(true).open(&disk_path).unwrap();
        let sink = Sink::default();
        let mut pv = Pv::new(ConsoleOut::new(Box::new(sink.clone())), Some(disk)).unwrap();
        // A valid vCPU page most of the time, so the ring code is reached.
        assert_eq!(pv.wrmsr(&mem, abi::MSR_VCPU_PAGE, 0x8000 | 1), Some(true));
        let now = Instant::now();
        for i in 0..ITERATIONS {
            match rng.next() % 8 {
                0 => {
                    let msr = [abi::MSR_HYPERCALL_PAGE, abi::MSR_VCPU_PAGE][(rng.next() % 2) as usize];
                    let v = rng.arg(RAM);
                    let ok = pv.wrmsr(&mem, msr, v).expect("our MSR");
                    let page_ok = v == 0 || (v & 1 == 1 && (v & !1) % 4096 == 0 && (v & !1) + 4096 <= RAM);
                    assert_eq!(ok, page_ok, "seed {seed} iter {i}: wrmsr {msr:#x} {v:#x}");
                }
                1 => {
                    // Scribble on the shared page: ring indices, requests.
                    let off = rng.next() % 4096;
                    let _ = mem.write_obj(rng.next() as u32, GuestAddress(0x8000 + (off & !3)));
                }
                _ => {
                    let nr = if rng.next() % 4 == 0 { rng.arg(RAM) } else { rng.next() % (hc::COUNT + 2) };
                    if nr == hc::HALT || nr == hc::YIELD {
                        continue;
                    }
                    let a = [rng.arg(RAM), rng.arg(RAM), rng.arg(RAM), rng.arg(RAM)];
                    match pv.hypercall(&mem, nr, a, now) {
                        Outcome::Ret(r) => {
                            if nr >= hc::COUNT {
                                assert_eq!(r, abi::err::NOSYS, "seed {seed} iter {i}");
                            }
                        }
                        Outcome::Shutdown(s) => assert!(nr == hc::SHUTDOWN && (0..=255).contains(&s)),
                        Outcome::Fatal(m) => assert!(!m.is_empty()),
                        Outcome::Halt => panic!("only HALT halts"),
                        Outcome::Suspend => assert_eq!(nr, hc::SUSPEND, "seed {seed} iter {i}"),
                    }
                }
            }
        }
    }
}

#[test]
fn xen_dispatcher_survives_random_input() {
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let version = [Version::V4_17, Version::V3_0_2][seed as usize % 2];
        let mut x = Xen::new(ConsoleOut::new(Box::new(Sink::default())), version);
        // Identity translation below RAM, unmapped above: like a guest's page tables.
        let tr = |la: u64| (la < RAM).then_some(la);
        for i in 0..ITERATIONS {
            let nr = if rng.next() % 2 == 0 {
                [6, 12, 15, 16, 17, 18, 24, 29, 32, 33, 34][(rng.next() % 11) as usize]
            } else {
                rng.arg(RAM)
            };
            let a = [rng.next() % 12, rng.arg(RAM), rng.arg(RAM), rng.arg(RAM), rng.arg(RAM)];
            // Only the scheduler's block and suspend leave the hypercall pending.
            let sched = matches!((version, nr), (Version::V4_17, 29) | (Version::V3_0_2, 6));
            match x.hypercall(&mem, nr, a, rng.next() % 2 == 0, &tr) {
                Outcome::Halt => assert!(sched && a[0] == 1, "seed {seed} iter {i}: halt from {nr} {a:x?}"),
                Outcome::Suspend => assert!(sched && a[0] == 2, "seed {seed} iter {i}: suspend from {nr} {a:x?}"),
                _ => {}
            }
        }
    }
}

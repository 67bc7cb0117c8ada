//! Host tests of what the `hv` backend adds to the shared device models and the backend
//! table: the PIC's end-of-interrupt decoding (the acknowledgement of a timer event), the
//! PIC/PIT state the example kernel's set-up sequence leaves (event vector, timer period),
//! and which sites `hv` routes.

use previrt_runtime::backend::{self, Route};
use previrt_runtime::devices::{device, Dev, Pic, Pit};
use previrt_site_abi::{flags, Kind, SiteRecord, KINDS};

#[test]
fn pic_end_of_interrupt_decoding() {
    // Non-specific EOI (what the example kernel and Linux send), specific EOI for IRQ0 and 3.
    assert!(Pic::is_eoi(0, 0x20, 0));
    assert!(Pic::is_eoi(0, 0x60, 0));
    assert!(!Pic::is_eoi(0, 0x63, 0), "specific EOI for IRQ3 is not IRQ0's");
    assert!(Pic::is_eoi(0, 0x63, 3));
    // ICW1 (bit 4), OCW3 read-ISR (bit 3), mask writes (data port) are not EOIs.
    assert!(!Pic::is_eoi(0, 0x11, 0));
    assert!(!Pic::is_eoi(0, 0x0b, 0));
    assert!(!Pic::is_eoi(1, 0x20, 0));
}

#[test]
fn example_kernel_set_up_gives_the_event_vector_and_the_timer_period() {
    // The example kernel's pic_init and pit_set_hz(1000) sequences, port by port.
    let mut pic = [Pic::new(), Pic::new()];
    let mut pit = Pit::new();
    let seq: &[(u16, u8)] = &[
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, 0x20),
        (0xa1, 0x28),
        (0x21, 0x04),
        (0xa1, 0x02),
        (0x21, 0x01),
        (0xa1, 0x01),
        (0x21, 0xfe),
        (0xa1, 0xff),
    ];
    for &(port, v) in seq {
        match device(port) {
            Some((Dev::PicMaster, r)) => pic[0].write(r, v),
            Some((Dev::PicSlave, r)) => pic[1].write(r, v),
            other => panic!("{port:#x}: {other:?}"),
        }
    }
    // What the hv backend passes to SET_EVENT_VECTOR: IRQ0's vector, unmasked.
    assert_eq!((pic[0].base, pic[0].mask & 1), (0x20, 0));
    assert_eq!(pic[1].mask, 0xff);
    let divisor = (1_193_182u32 + 500) / 1000;
    assert_eq!(pit.write(3, 0x34, 0), None);
    assert_eq!(pit.write(0, divisor as u8, 0), None);
    assert_eq!(pit.write(0, (divisor >> 8) as u8, 0), Some(divisor));
    // TIMER_SET's period: 1 ms within a PIT tick.
    assert!(pit.period_ns().abs_diff(1_000_000) < 1_000, "{}", pit.period_ns());
}

fn record(kind: Kind, flag_bits: u16) -> SiteRecord {
    SiteRecord { kind: kind as u16, flags: flag_bits, ..Default::default() }
}

#[test]
fn hv_routes_exactly_its_kinds_in_long_mode() {
    assert_eq!(backend::by_name(b"hv").map(|b| b.id), Some(backend::HV.id));
    assert_eq!(backend::by_id(backend::HV.id).map(|b| b.name), Some("hv"));
    for info in KINDS {
        let want = if previrt_runtime::hv::ROUTED.contains(&info.kind) { Route::Stub } else { Route::Original };
        assert_eq!((backend::HV.route)(&record(info.kind, 0)), want, "{}", info.name);
        for f in [flags::CODE32, flags::CODE16, flags::TRAP] {
            assert_eq!((backend::HV.route)(&record(info.kind, f)), Route::Original, "{} with flag {f:#x}", info.name);
        }
    }
    // The interrupt flag, port I/O and hlt are all routed (none may exit).
    for k in [Kind::Cli, Kind::Sti, Kind::Pushf, Kind::Popf, Kind::Iret, Kind::In, Kind::Out, Kind::Hlt] {
        assert!(previrt_runtime::hv::ROUTED.contains(&k), "{k:?}");
    }
}

//! The Xen console ring (xen/include/public/io/console.h, `struct xencons_interface`): one
//! shared page with an input ring of 1024 bytes and an output ring of 2048 bytes, each with a
//! free-running consumer and producer index (u32, wrapping; the byte for index `i` is at
//! `i % size`). A domain that is not the initial one has no `console_io` access: it writes its
//! console to the output ring and kicks the console back end through an event channel.
//!
//! Built for the host too (tested there) and shared by every backend that talks to a Xen
//! console: the PV backend finds the page in `start_info.console.domU`, an HVM-style backend
//! through `HVM_PARAM_CONSOLE_PFN`, and a host-side back end (the VMM's Xen personality)
//! consumes the same ring. The ring does no notification itself: after [`Ring::write`] the
//! producer signals the event channel (`EVTCHNOP_send`), and when the ring is full it waits
//! for the consumer (for instance `SCHEDOP_yield`) and writes the rest.
//!
//! Ordering: the producer stores the bytes before it publishes the new producer index
//! (release); the consumer reads the producer index (acquire) before the bytes, and publishes
//! its consumer index only after copying them out.

use core::sync::atomic::{fence, Ordering};

/// Size of the guest → back end (output) ring.
pub const OUT_SIZE: usize = 2048;
/// Size of the back end → guest (input) ring.
pub const IN_SIZE: usize = 1024;

/// `struct xencons_interface`, as laid out in the shared page.
#[repr(C)]
pub struct Interface {
    pub input: [u8; IN_SIZE],
    pub output: [u8; OUT_SIZE],
    pub in_cons: u32,
    pub in_prod: u32,
    pub out_cons: u32,
    pub out_prod: u32,
}

const _: () = assert!(core::mem::size_of::<Interface>() == IN_SIZE + OUT_SIZE + 16);

/// One side's view of a console page's output ring.
pub struct Ring {
    page: *mut Interface,
}

impl Ring {
    /// The ring in the page at `page`.
    ///
    /// # Safety
    /// `page` points to a mapped, writable page holding a `xencons_interface` for as long as
    /// the ring is used; the other side only follows the protocol above.
    pub const unsafe fn new(page: *mut u8) -> Ring {
        Ring { page: page as *mut Interface }
    }

    /// The output ring's (producer, consumer) index fields.
    fn indexes(&self) -> (*mut u32, *mut u32) {
        // SAFETY: projecting fields of the mapped page (Ring::new's contract), no access.
        unsafe { (core::ptr::addr_of_mut!((*self.page).out_prod), core::ptr::addr_of_mut!((*self.page).out_cons)) }
    }

    /// Bytes written and not yet consumed (a corrupt index pair counts as a full ring).
    pub fn pending(&self) -> usize {
        let (prod, cons) = self.indexes();
        // SAFETY: fields of the mapped page, shared with the other side.
        let used = unsafe { prod.read_volatile().wrapping_sub(cons.read_volatile()) } as usize;
        used.min(OUT_SIZE)
    }

    /// Producer: copy as much of `data` as fits and publish it; returns how many bytes were
    /// taken (0 when the ring is full). The caller then notifies the back end.
    pub fn write(&mut self, data: &[u8]) -> usize {
        let (prod_at, _) = self.indexes();
        // SAFETY: a field of the mapped page; only this side writes it.
        let prod = unsafe { prod_at.read_volatile() };
        let n = data.len().min(OUT_SIZE - self.pending());
        for (i, &b) in data[..n].iter().enumerate() {
            let at = prod.wrapping_add(i as u32) as usize % OUT_SIZE;
            // SAFETY: `at` < OUT_SIZE, inside the page's output array.
            unsafe { core::ptr::addr_of_mut!((*self.page).output[at]).write_volatile(b) };
        }
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { prod_at.write_volatile(prod.wrapping_add(n as u32)) };
        n
    }

    /// Consumer (the back end's side): copy up to `buf.len()` pending bytes out and free
    /// their space; returns how many were copied.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let (_, cons_at) = self.indexes();
        // SAFETY: a field of the mapped page; only this side writes it.
        let cons = unsafe { cons_at.read_volatile() };
        let n = buf.len().min(self.pending());
        fence(Ordering::Acquire);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = cons.wrapping_add(i as u32) as usize % OUT_SIZE;
            // SAFETY: `at` < OUT_SIZE, inside the page's output array.
            *b = unsafe { core::ptr::addr_of!((*self.page).output[at]).read_volatile() };
        }
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { cons_at.write_volatile(cons.wrapping_add(n as u32)) };
        n
    }
}

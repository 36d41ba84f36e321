//! The guest runtime's protocol client (`guest_runtime::client`) over the
//! harness VMM: the session buffer is read and written in the shared guest
//! RAM, and [`SubmitChannel`]'s submit is one `SUBMIT_3D` through the real
//! socket, answered before it returns.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{Ordering, fence};

use guest_runtime::client::Channel;
use vhost_gpu_nc::virtio_gpu::protocol::VIRTIO_GPU_RESP_OK_NODATA;

use super::Vmm;

/// The harness VMM, shared by the channels of its contexts.
pub type Shared = Rc<RefCell<Vmm>>;

/// A session buffer in guest RAM, in pieces of (offset in the buffer, GPA,
/// length); every access is checked against them.
pub struct SessionRam {
    vmm: Shared,
    parts: Vec<(u64, u64, u64)>,
}

impl SessionRam {
    /// A buffer made of `parts` (offset, GPA, length).
    pub fn new(vmm: Shared, parts: Vec<(u64, u64, u64)>) -> SessionRam {
        SessionRam { vmm, parts }
    }

    /// A buffer of `len` bytes at `gpa`.
    pub fn contiguous(vmm: Shared, gpa: u64, len: u64) -> SessionRam {
        SessionRam::new(vmm, vec![(0, gpa, len)])
    }

    fn at(&self, off: u64, len: usize) -> io::Result<u64> {
        let end = off.checked_add(len as u64);
        self.parts
            .iter()
            .find(|(o, _, l)| off >= *o && end.is_some_and(|e| e <= o + l))
            .map(|(o, gpa, _)| gpa + (off - o))
            .ok_or_else(|| io::ErrorKind::InvalidInput.into())
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let gpa = self.at(off, buf.len())?;
        buf.copy_from_slice(&self.vmm.borrow().ram.read(gpa, buf.len()));
        Ok(())
    }

    pub fn write(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        let gpa = self.at(off, bytes.len())?;
        self.vmm.borrow().ram.write(gpa, bytes);
        Ok(())
    }

    pub fn load_u32(&self, off: u64) -> io::Result<u32> {
        let gpa = self.at(off, 4)?;
        let v = self.vmm.borrow().ram.u32(gpa);
        fence(Ordering::Acquire);
        Ok(v)
    }

    pub fn load_u64(&self, off: u64) -> io::Result<u64> {
        let gpa = self.at(off, 8)?;
        let v = self.vmm.borrow().ram.u64(gpa);
        fence(Ordering::Acquire);
        Ok(v)
    }

    pub fn store_u32(&self, off: u64, value: u32) -> io::Result<()> {
        fence(Ordering::Release);
        self.write(off, &value.to_le_bytes())
    }
}

/// A context's channel whose submit blocks until the device answered.
pub struct SubmitChannel {
    pub ram: SessionRam,
    pub ctx: u32,
}

impl Channel for SubmitChannel {
    fn submit(&mut self, stream: &[u8], _ring: Option<u32>) -> io::Result<()> {
        let vmm = self.ram.vmm.clone();
        match vmm.borrow_mut().submit(self.ctx, stream) {
            VIRTIO_GPU_RESP_OK_NODATA => Ok(()),
            other => Err(io::Error::other(format!("SUBMIT_3D: {other:#x}"))),
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.ram.read(off, buf)
    }

    fn write(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        self.ram.write(off, bytes)
    }

    fn load_u32(&self, off: u64) -> io::Result<u32> {
        self.ram.load_u32(off)
    }

    fn load_u64(&self, off: u64) -> io::Result<u64> {
        self.ram.load_u64(off)
    }

    fn store_u32(&self, off: u64, value: u32) -> io::Result<()> {
        self.ram.store_u32(off, value)
    }
}

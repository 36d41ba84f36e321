//! The virtio-gpu device model: one control command in, one response out.
//!
//! This is the part of the device that knows virtio-gpu and nothing about
//! virtqueues: it takes the bytes of a request and returns the bytes of its
//! response (plus, for a `SUBMIT_3D`, whether the compute layer holds its
//! fence). Every id, size, rectangle and memory entry is checked here; what
//! a context does with its submissions is the compute layer's business.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpu_backend::GuestRam;

use super::display::Display;
use super::resources::{Resource, backing_cost, parse_entries, read_backing};
use super::wire::{CtrlHdr, Cursor, FLAG_FENCE, FLAG_INFO_RING_IDX, HDR_SIZE, Rect, cmd, resp};
use crate::context_backend::{
    ContextBackend, ContextBackendError, ContextInit, CtxId, FenceDisposition, FenceRef,
    GuestBacking, ResourceId, ResourceKind,
};

/// `VIRTIO_GPU_F_*` bits the device offers.
pub mod feature {
    /// 3D (Linux needs it for EXECBUFFER and context creation).
    pub const VIRGL: u64 = 1 << 0;
    /// EDID.
    pub const EDID: u64 = 1 << 1;
    /// Blob resources.
    pub const RESOURCE_BLOB: u64 = 1 << 3;
    /// Contexts created with a capset id.
    pub const CONTEXT_INIT: u64 = 1 << 4;
}

/// `VIRTIO_GPU_FORMAT_*` with 4 bytes per pixel (all of them but the
/// planar ones Linux never scans out).
const FORMATS_32BPP: [u32; 8] = [1, 2, 3, 4, 67, 68, 121, 134];
/// `PIPE_BUFFER`.
const PIPE_BUFFER: u32 = 0;
/// `VIRTIO_GPU_BLOB_MEM_GUEST`.
const BLOB_MEM_GUEST: u32 = 1;
/// Largest 2D image the host copies (bytes).
const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// Bytes of a `width` x `height` image at 4 bytes per pixel (saturating:
/// guest values).
fn image_bytes(width: u32, height: u32) -> u64 {
    u64::from(width)
        .saturating_mul(u64::from(height))
        .saturating_mul(4)
}

/// Per-guest limits of the virtio-gpu layer.
#[derive(Clone, Copy, Debug)]
pub struct GpuLimits {
    /// Resources alive at once.
    pub max_resources: u32,
    /// Memory entries per backing.
    pub max_backing_entries: u32,
    /// Host memory for copies of 2D images (scanout sources), in total.
    pub max_image_bytes: u64,
    /// Host memory for the entry lists of resource backings, in total (16
    /// bytes per stored entry, after adjacent entries are merged). The
    /// default, 64 MiB, describes 16 GiB of guest memory scattered in
    /// 4 KiB pages.
    pub max_backing_bytes: u64,
}

impl Default for GpuLimits {
    fn default() -> GpuLimits {
        GpuLimits {
            max_resources: 16384,
            max_backing_entries: 1 << 18,
            max_image_bytes: 256 << 20,
            max_backing_bytes: 64 << 20,
        }
    }
}

/// What the queue worker does with a processed command.
#[derive(Debug)]
pub struct Response {
    /// The response bytes.
    pub bytes: Vec<u8>,
    /// The request's fence, if it had one.
    pub fence: Option<FenceRef>,
    /// Whether the compute layer holds the fence.
    pub held: bool,
}

/// The device state of one connection.
pub struct GpuDevice {
    memory: Option<GuestRam>,
    features: u64,
    limits: GpuLimits,
    resources: BTreeMap<ResourceId, Resource>,
    /// Host bytes reserved for 2D image copies.
    image_bytes: u64,
    /// Host bytes of backing entry lists.
    backing_bytes: u64,
    /// The backing budget was hit (logged once until usage drops).
    backing_budget_hit: bool,
    contexts: BTreeMap<CtxId, ContextInit>,
    scanout: Option<(ResourceId, Rect)>,
    display: Display,
    compute: Box<dyn ContextBackend>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("features", &self.features)
            .field("resources", &self.resources.len())
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

type Handled = Result<Vec<u8>, u32>;

fn nodata(hdr: &CtrlHdr) -> Handled {
    let mut out = Vec::with_capacity(HDR_SIZE);
    hdr.response(resp::OK_NODATA).write(&mut out);
    Ok(out)
}

fn compute_error(e: ContextBackendError) -> u32 {
    match e {
        ContextBackendError::InvalidContext => resp::ERR_INVALID_CONTEXT_ID,
        ContextBackendError::InvalidParameter => resp::ERR_INVALID_PARAMETER,
        ContextBackendError::OutOfMemory => resp::ERR_OUT_OF_MEMORY,
    }
}

impl GpuDevice {
    /// A device with no resources or contexts.
    pub fn new(compute: Box<dyn ContextBackend>, limits: GpuLimits) -> GpuDevice {
        GpuDevice {
            memory: None,
            features: 0,
            limits,
            resources: BTreeMap::new(),
            image_bytes: 0,
            backing_bytes: 0,
            backing_budget_hit: false,
            contexts: BTreeMap::new(),
            scanout: None,
            display: Display::default(),
            compute,
        }
    }

    /// Features the guest acked.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
    }

    /// Guest RAM changed.
    pub fn set_memory(&mut self, memory: GuestRam) {
        self.compute.set_memory(memory.clone());
        self.memory = Some(memory);
    }

    /// The display side.
    pub fn display_mut(&mut self) -> &mut Display {
        &mut self.display
    }

    /// `num_capsets` of the config space.
    pub fn num_capsets(&self) -> u32 {
        u32::try_from(self.compute.capsets().len()).unwrap_or(0)
    }

    /// Periodic work of the compute layer.
    pub fn tick(&mut self) {
        self.compute.tick();
    }

    /// Destroys every context (disconnect).
    pub fn teardown(&mut self) {
        let ctxs: Vec<CtxId> = self.contexts.keys().copied().collect();
        for ctx in ctxs {
            self.compute.destroy_context(ctx);
        }
        self.contexts.clear();
        self.resources.clear();
        self.image_bytes = 0;
        self.backing_bytes = 0;
        self.backing_budget_hit = false;
        self.scanout = None;
    }

    /// Device reset (`VHOST_USER_RESET_DEVICE`): everything of the guest
    /// goes, as on a disconnect; the memory table and the GPU socket are
    /// the transport's and stay.
    pub fn reset(&mut self) {
        self.teardown();
        self.features = 0;
    }

    /// Reserves `backing`'s host bytes against the guest's budget.
    fn charge_backing(&mut self, id: ResourceId, backing: &GuestBacking) -> Result<(), u32> {
        let cost = backing_cost(backing);
        let total = self.backing_bytes.saturating_add(cost);
        let budget = self.limits.max_backing_bytes;
        if total > budget {
            if !std::mem::replace(&mut self.backing_budget_hit, true) {
                log::warn!(
                    "{id:?}: a backing of {} entries ({cost} bytes of host memory) is over the \
                     guest's budget for backing entries ({} of {budget} bytes in use; \
                     --max-backing-bytes): out of memory",
                    backing.entries.len(),
                    self.backing_bytes
                );
            } else {
                log::debug!("{id:?}: backing over the budget ({cost} bytes)");
            }
            return Err(resp::ERR_OUT_OF_MEMORY);
        }
        self.backing_bytes = total;
        Ok(())
    }

    /// Gives a backing's host bytes back to the budget.
    fn refund_backing(&mut self, backing: Option<&Arc<GuestBacking>>) {
        if let Some(b) = backing {
            self.backing_bytes = self.backing_bytes.saturating_sub(backing_cost(b));
            self.backing_budget_hit = false;
        }
    }

    /// Processes one control-queue request.
    pub fn process(&mut self, request: &[u8]) -> Response {
        let mut r = Cursor::new(request);
        let Some(hdr) = CtrlHdr::parse(&mut r) else {
            let mut bytes = Vec::new();
            CtrlHdr::default()
                .response(resp::ERR_UNSPEC)
                .write(&mut bytes);
            return Response {
                bytes,
                fence: None,
                held: false,
            };
        };
        let fence = (hdr.flags & FLAG_FENCE != 0).then_some(FenceRef {
            ctx: CtxId(hdr.ctx_id),
            fence_id: hdr.fence_id,
            ring_idx: (hdr.flags & FLAG_INFO_RING_IDX != 0).then_some(hdr.ring_idx),
        });
        let mut held = false;
        let result = self.dispatch(&hdr, &mut r, fence, &mut held);
        let bytes = result.unwrap_or_else(|err| {
            log::debug!("command {:#x} failed: {err:#x}", hdr.type_);
            let mut out = Vec::with_capacity(HDR_SIZE);
            hdr.response(err).write(&mut out);
            out
        });
        Response { bytes, fence, held }
    }

    fn dispatch(
        &mut self,
        hdr: &CtrlHdr,
        r: &mut Cursor<'_>,
        fence: Option<FenceRef>,
        held: &mut bool,
    ) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        match hdr.type_ {
            cmd::GET_DISPLAY_INFO => Ok(self.display_info(hdr)),
            cmd::GET_EDID => self.get_edid(hdr, r),
            cmd::RESOURCE_CREATE_2D => self.create_2d(hdr, r),
            cmd::RESOURCE_UNREF => {
                let id = ResourceId(r.u32().ok_or(bad)?);
                self.unref(id)?;
                nodata(hdr)
            }
            cmd::SET_SCANOUT => self.set_scanout(hdr, r),
            cmd::SET_SCANOUT_BLOB => self.set_scanout_blob(hdr, r),
            cmd::RESOURCE_FLUSH => self.flush(hdr, r),
            cmd::TRANSFER_TO_HOST_2D => self.transfer_2d(hdr, r),
            cmd::RESOURCE_ATTACH_BACKING => self.attach_backing(hdr, r),
            cmd::RESOURCE_DETACH_BACKING => {
                let id = ResourceId(r.u32().ok_or(bad)?);
                self.detach_backing(id)?;
                nodata(hdr)
            }
            cmd::GET_CAPSET_INFO => self.capset_info(hdr, r),
            cmd::GET_CAPSET => self.capset(hdr, r),
            cmd::CTX_CREATE => self.ctx_create(hdr, r),
            cmd::CTX_DESTROY => {
                self.ctx_destroy(CtxId(hdr.ctx_id))?;
                nodata(hdr)
            }
            cmd::CTX_ATTACH_RESOURCE => self.ctx_attach(hdr, r),
            cmd::CTX_DETACH_RESOURCE => self.ctx_detach(hdr, r),
            cmd::RESOURCE_CREATE_3D => self.create_3d(hdr, r),
            cmd::TRANSFER_TO_HOST_3D | cmd::TRANSFER_FROM_HOST_3D => self.transfer_3d(hdr, r),
            cmd::RESOURCE_CREATE_BLOB => self.create_blob(hdr, r),
            cmd::SUBMIT_3D => self.submit(hdr, r, fence, held),
            cmd::RESOURCE_MAP_BLOB | cmd::RESOURCE_UNMAP_BLOB => Err(resp::ERR_UNSPEC),
            _ => Err(resp::ERR_UNSPEC),
        }
    }

    fn memory(&self) -> Result<&GuestRam, u32> {
        self.memory.as_ref().ok_or(resp::ERR_UNSPEC)
    }

    fn display_info(&self, hdr: &CtrlHdr) -> Vec<u8> {
        let (w, h, enabled) = self.display.mode();
        let mut out = Vec::with_capacity(HDR_SIZE + 16 * 24);
        hdr.response(resp::OK_DISPLAY_INFO).write(&mut out);
        for scanout in 0..16 {
            let (rect, en) = if scanout == 0 {
                (
                    Rect {
                        x: 0,
                        y: 0,
                        width: w,
                        height: h,
                    },
                    u32::from(enabled),
                )
            } else {
                (Rect::default(), 0)
            };
            rect.write(&mut out);
            out.extend_from_slice(&en.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        out
    }

    fn get_edid(&self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let scanout = r.u32().ok_or(resp::ERR_INVALID_PARAMETER)?;
        if scanout != 0 {
            return Err(resp::ERR_INVALID_SCANOUT_ID);
        }
        let edid = self.display.edid();
        let mut out = Vec::with_capacity(HDR_SIZE + 8 + 1024);
        hdr.response(resp::OK_EDID).write(&mut out);
        out.extend_from_slice(&(edid.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut block = [0u8; 1024];
        let n = edid.len().min(1024);
        block[..n].copy_from_slice(&edid[..n]);
        out.extend_from_slice(&block);
        Ok(out)
    }

    fn check_new_resource(&self, id: ResourceId) -> Result<(), u32> {
        if id.0 == 0 || self.resources.contains_key(&id) {
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        }
        if self.resources.len() >= self.limits.max_resources as usize {
            return Err(resp::ERR_OUT_OF_MEMORY);
        }
        Ok(())
    }

    fn new_resource(&mut self, res: Resource) -> Result<(), u32> {
        self.check_new_resource(res.id)?;
        self.resources.insert(res.id, res);
        Ok(())
    }

    fn create_2d(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let (id, _format, width, height) = (
            r.u32().ok_or(bad)?,
            r.u32().ok_or(bad)?,
            r.u32().ok_or(bad)?,
            r.u32().ok_or(bad)?,
        );
        let size = image_bytes(width, height);
        if width == 0 || height == 0 || size > MAX_IMAGE_BYTES {
            return Err(bad);
        }
        // The host copy is allocated on the first transfer; its bytes are
        // reserved now, against the guest's total.
        let total = self.image_bytes.saturating_add(size);
        if total > self.limits.max_image_bytes {
            return Err(resp::ERR_OUT_OF_MEMORY);
        }
        let res = Resource::new(ResourceId(id), ResourceKind::Image2d, width, height, size);
        self.new_resource(res)?;
        self.image_bytes = total;
        nodata(hdr)
    }

    fn create_3d(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let id = r.u32().ok_or(bad)?;
        let target = r.u32().ok_or(bad)?;
        let _format = r.u32().ok_or(bad)?;
        let _bind = r.u32().ok_or(bad)?;
        let width = r.u32().ok_or(bad)?;
        let height = r.u32().ok_or(bad)?;
        let (kind, size) = if target == PIPE_BUFFER {
            if width == 0 {
                return Err(bad);
            }
            (ResourceKind::Buffer3d, u64::from(width))
        } else {
            (ResourceKind::Other3d, 0)
        };
        let res = Resource::new(ResourceId(id), kind, width, height, size);
        self.new_resource(res)?;
        nodata(hdr)
    }

    fn create_blob(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        if self.features & feature::RESOURCE_BLOB == 0 {
            return Err(resp::ERR_UNSPEC);
        }
        let id = r.u32().ok_or(bad)?;
        let blob_mem = r.u32().ok_or(bad)?;
        let _blob_flags = r.u32().ok_or(bad)?;
        let nr_entries = r.u32().ok_or(bad)?;
        let _blob_id = r.u64().ok_or(bad)?;
        let size = r.u64().ok_or(bad)?;
        if blob_mem != BLOB_MEM_GUEST || size == 0 {
            return Err(bad);
        }
        let backing = parse_entries(
            r,
            nr_entries,
            self.limits.max_backing_entries,
            self.memory()?,
        )
        .map_err(|_| bad)?;
        if backing.len() < size {
            return Err(bad);
        }
        let id = ResourceId(id);
        self.check_new_resource(id)?;
        self.charge_backing(id, &backing)?;
        let mut res = Resource::new(id, ResourceKind::BlobGuest, 0, 0, size);
        res.backing = Some(Arc::new(backing));
        self.resources.insert(id, res);
        nodata(hdr)
    }

    fn unref(&mut self, id: ResourceId) -> Result<(), u32> {
        let res = self
            .resources
            .get(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        for ctx in res.contexts.clone() {
            self.compute.detach_resource(ctx, id);
        }
        if self.scanout.is_some_and(|(s, _)| s == id) {
            self.scanout = None;
            self.display.set_scanout(0, 0);
        }
        if let Some(res) = self.resources.remove(&id) {
            if res.kind == ResourceKind::Image2d {
                self.image_bytes = self.image_bytes.saturating_sub(res.size);
            }
            self.refund_backing(res.backing.as_ref());
        }
        Ok(())
    }

    fn set_scanout(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let rect = Rect::parse(r).ok_or(bad)?;
        let scanout = r.u32().ok_or(bad)?;
        let id = ResourceId(r.u32().ok_or(bad)?);
        self.scan_out(scanout, id, rect)?;
        nodata(hdr)
    }

    fn set_scanout_blob(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let rect = Rect::parse(r).ok_or(bad)?;
        let scanout = r.u32().ok_or(bad)?;
        let id = ResourceId(r.u32().ok_or(bad)?);
        let width = r.u32().ok_or(bad)?;
        let height = r.u32().ok_or(bad)?;
        let format = r.u32().ok_or(bad)?;
        let _padding = r.u32().ok_or(bad)?;
        let stride = r.u32().ok_or(bad)?;
        r.skip(12).ok_or(bad)?; // strides of planes 1..3
        let offset = r.u32().ok_or(bad)?;
        r.skip(12).ok_or(bad)?; // offsets of planes 1..3
        if scanout != 0 {
            return Err(resp::ERR_INVALID_SCANOUT_ID);
        }
        if id.0 != 0 {
            let res = self
                .resources
                .get_mut(&id)
                .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
            // One plane of 4-byte pixels inside the blob.
            let row = u64::from(width) * 4;
            let end = u64::from(height)
                .checked_sub(1)
                .map(|rows| u64::from(offset) + rows * u64::from(stride) + row);
            let fits = end.is_some_and(|end| end <= res.size);
            if res.kind != ResourceKind::BlobGuest
                || !FORMATS_32BPP.contains(&format)
                || width == 0
                || u64::from(stride) < row
                || !fits
                || image_bytes(width, height) > MAX_IMAGE_BYTES
            {
                return Err(bad);
            }
            res.width = width;
            res.height = height;
            res.stride = u64::from(stride);
            res.offset = u64::from(offset);
        }
        self.scan_out(scanout, id, rect)?;
        nodata(hdr)
    }

    fn scan_out(&mut self, scanout: u32, id: ResourceId, rect: Rect) -> Result<(), u32> {
        if scanout != 0 {
            return Err(resp::ERR_INVALID_SCANOUT_ID);
        }
        if id.0 == 0 {
            self.scanout = None;
            self.display.set_scanout(0, 0);
            return Ok(());
        }
        let res = self
            .resources
            .get(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if !matches!(res.kind, ResourceKind::Image2d | ResourceKind::BlobGuest)
            || !rect.inside(res.width, res.height)
        {
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        self.scanout = Some((id, rect));
        self.display.set_scanout(rect.width, rect.height);
        Ok(())
    }

    fn transfer_2d(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let rect = Rect::parse(r).ok_or(bad)?;
        let offset = r.u64().ok_or(bad)?;
        let id = ResourceId(r.u32().ok_or(bad)?);
        let mem = self.memory()?.clone();
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if res.kind != ResourceKind::Image2d || !rect.inside(res.width, res.height) {
            return Err(bad);
        }
        let backing = res.backing.clone().ok_or(resp::ERR_UNSPEC)?;
        let stride = u64::from(res.width) * 4;
        let image = res
            .image
            .get_or_insert_with(|| vec![0; (stride * u64::from(res.height)) as usize]);
        let row_len = (u64::from(rect.width) * 4) as usize;
        for row in 0..u64::from(rect.height) {
            let src = offset.checked_add(row * stride).ok_or(bad)?;
            let dst = ((u64::from(rect.y) + row) * stride + u64::from(rect.x) * 4) as usize;
            let Some(line) = image.get_mut(dst..dst + row_len) else {
                return Err(bad);
            };
            if !read_backing(&mem, &backing, src, line) {
                return Err(bad);
            }
        }
        nodata(hdr)
    }

    fn flush(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let rect = Rect::parse(r).ok_or(bad)?;
        let id = ResourceId(r.u32().ok_or(bad)?);
        let res = self
            .resources
            .get(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if !rect.inside(res.width, res.height) {
            return Err(bad);
        }
        if self.scanout.is_some_and(|(s, _)| s == id) {
            if let Some(pixels) = self.pixels(res, rect) {
                self.display.update(rect, pixels);
            }
        }
        nodata(hdr)
    }

    /// The pixels of `rect`, from the host copy (2D) or the guest memory
    /// (blob scanout).
    fn pixels(&self, res: &Resource, rect: Rect) -> Option<Vec<u8>> {
        let row_len = (u64::from(rect.width) * 4) as usize;
        let mut out = vec![0u8; row_len * rect.height as usize];
        for (row, line) in out.chunks_exact_mut(row_len.max(1)).enumerate() {
            let at =
                res.offset + (u64::from(rect.y) + row as u64) * res.stride + u64::from(rect.x) * 4;
            match (&res.image, &res.backing) {
                (Some(image), _) => {
                    line.copy_from_slice(image.get(at as usize..at as usize + row_len)?)
                }
                (None, Some(b)) if res.kind == ResourceKind::BlobGuest => {
                    if !read_backing(self.memory.as_ref()?, b, at, line) {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        Some(out)
    }

    fn attach_backing(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let id = ResourceId(r.u32().ok_or(bad)?);
        let nr = r.u32().ok_or(bad)?;
        let max = self.limits.max_backing_entries;
        let backing = parse_entries(r, nr, max, self.memory()?).map_err(|_| bad)?;
        let res = self
            .resources
            .get(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if res.backing.is_some() {
            return Err(resp::ERR_UNSPEC);
        }
        self.charge_backing(id, &backing)?;
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        res.backing = Some(Arc::new(backing));
        let view = res.view();
        for ctx in res.contexts.clone() {
            if let Err(e) = self.compute.attach_resource(ctx, &view) {
                log::debug!("{ctx:?}: attaching backing of {id:?}: {e}");
            }
        }
        nodata(hdr)
    }

    fn detach_backing(&mut self, id: ResourceId) -> Result<(), u32> {
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if res.kind == ResourceKind::BlobGuest || res.backing.is_none() {
            return Err(resp::ERR_UNSPEC);
        }
        let contexts = res.contexts.clone();
        let backing = res.backing.take();
        res.image = None;
        self.refund_backing(backing.as_ref());
        for ctx in contexts {
            // The context stops using the pages before the guest gets them
            // back; it sees the resource again on the next attach.
            self.compute.detach_resource(ctx, id);
        }
        Ok(())
    }

    fn capset_info(&self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let index = r.u32().ok_or(resp::ERR_INVALID_PARAMETER)?;
        let info = self
            .compute
            .capsets()
            .get(index as usize)
            .copied()
            .ok_or(resp::ERR_INVALID_PARAMETER)?;
        let mut out = Vec::with_capacity(40);
        hdr.response(resp::OK_CAPSET_INFO).write(&mut out);
        for v in [info.id, info.max_version, info.max_size, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    fn capset(&self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let id = r.u32().ok_or(bad)?;
        let version = r.u32().ok_or(bad)?;
        let data = self.compute.capset(id, version).ok_or(bad)?;
        let mut out = Vec::with_capacity(HDR_SIZE + data.len());
        hdr.response(resp::OK_CAPSET).write(&mut out);
        out.extend_from_slice(&data);
        Ok(out)
    }

    fn ctx_create(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let nlen = r.u32().ok_or(bad)?;
        let context_init = r.u32().ok_or(bad)?;
        let name = r.take(64).ok_or(bad)?;
        let ctx = CtxId(hdr.ctx_id);
        if ctx.0 == 0 || self.contexts.contains_key(&ctx) {
            return Err(resp::ERR_INVALID_CONTEXT_ID);
        }
        let capset = if self.features & feature::CONTEXT_INIT != 0 {
            context_init & 0xFF
        } else {
            0
        };
        let init = ContextInit {
            capset_id: (capset != 0).then_some(capset),
        };
        let name = name.get(..(nlen as usize).min(64)).unwrap_or_default();
        let name = String::from_utf8_lossy(name);
        self.compute
            .create_context(ctx, init, &name)
            .map_err(compute_error)?;
        self.contexts.insert(ctx, init);
        nodata(hdr)
    }

    /// Destroys a context: the compute layer frees everything of it.
    pub fn ctx_destroy(&mut self, ctx: CtxId) -> Result<(), u32> {
        if self.contexts.remove(&ctx).is_none() {
            return Err(resp::ERR_INVALID_CONTEXT_ID);
        }
        self.compute.destroy_context(ctx);
        for res in self.resources.values_mut() {
            res.contexts.remove(&ctx);
        }
        Ok(())
    }

    fn ctx_attach(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let id = ResourceId(r.u32().ok_or(resp::ERR_INVALID_PARAMETER)?);
        let ctx = CtxId(hdr.ctx_id);
        if !self.contexts.contains_key(&ctx) {
            return Err(resp::ERR_INVALID_CONTEXT_ID);
        }
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        self.compute
            .attach_resource(ctx, &res.view())
            .map_err(compute_error)?;
        res.contexts.insert(ctx);
        nodata(hdr)
    }

    fn ctx_detach(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let id = ResourceId(r.u32().ok_or(resp::ERR_INVALID_PARAMETER)?);
        let ctx = CtxId(hdr.ctx_id);
        if !self.contexts.contains_key(&ctx) {
            return Err(resp::ERR_INVALID_CONTEXT_ID);
        }
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if res.contexts.remove(&ctx) {
            self.compute.detach_resource(ctx, id);
        }
        nodata(hdr)
    }

    fn transfer_3d(&mut self, hdr: &CtrlHdr, r: &mut Cursor<'_>) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        r.skip(24 + 8).ok_or(bad)?; // box, offset
        let id = ResourceId(r.u32().ok_or(bad)?);
        let res = self
            .resources
            .get(&id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if res.backing.is_none() {
            return Err(resp::ERR_UNSPEC);
        }
        // The guest backing is the only copy of a buffer: nothing to move.
        nodata(hdr)
    }

    fn submit(
        &mut self,
        hdr: &CtrlHdr,
        r: &mut Cursor<'_>,
        fence: Option<FenceRef>,
        held: &mut bool,
    ) -> Handled {
        let bad = resp::ERR_INVALID_PARAMETER;
        let size = r.u32().ok_or(bad)? as usize;
        let in_fences = r.u32().ok_or(bad)? as usize;
        let ctx = CtxId(hdr.ctx_id);
        if !self.contexts.contains_key(&ctx) {
            return Err(resp::ERR_INVALID_CONTEXT_ID);
        }
        r.skip(in_fences.checked_mul(8).ok_or(bad)?).ok_or(bad)?;
        let commands = r.take(size).ok_or(bad)?;
        match self
            .compute
            .submit(ctx, commands, fence)
            .map_err(compute_error)?
        {
            FenceDisposition::SignalNow => {}
            FenceDisposition::Hold => *held = fence.is_some(),
        }
        nodata(hdr)
    }
}

impl GpuDevice {
    /// Processes one cursor-queue request (`UPDATE_CURSOR`, `MOVE_CURSOR`).
    pub fn process_cursor(&mut self, request: &[u8]) -> Vec<u8> {
        let mut r = Cursor::new(request);
        let Some(hdr) = CtrlHdr::parse(&mut r) else {
            return Vec::new();
        };
        let parsed = (|| {
            let _scanout = r.u32()?;
            let x = r.u32()?;
            let y = r.u32()?;
            let _pad = r.u32()?;
            let id = r.u32()?;
            let hot_x = r.u32()?;
            let hot_y = r.u32()?;
            Some((x, y, ResourceId(id), hot_x, hot_y))
        })();
        let status = match (hdr.type_, parsed) {
            (cmd::MOVE_CURSOR, Some((x, y, ..))) => {
                self.display.cursor_move(x, y);
                resp::OK_NODATA
            }
            (cmd::UPDATE_CURSOR, Some((x, y, id, hot_x, hot_y))) => {
                let image = self
                    .resources
                    .get(&id)
                    .filter(|res| res.width == 64 && res.height == 64)
                    .and_then(|res| res.image.as_ref())
                    .and_then(|img| <&[u8; 16384]>::try_from(img.as_slice()).ok());
                match image {
                    Some(img) => self.display.cursor_update(x, y, hot_x, hot_y, img),
                    None => self.display.cursor_move(x, y),
                }
                resp::OK_NODATA
            }
            _ => resp::ERR_INVALID_PARAMETER,
        };
        let mut out = Vec::with_capacity(HDR_SIZE);
        hdr.response(status).write(&mut out);
        out
    }
}

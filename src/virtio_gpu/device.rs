//! The virtio-gpu device model: one control command in, one response out.
//!
//! This is the part of the device that knows virtio-gpu and nothing about
//! virtqueues: a request is decoded once into a [`GpuCommand`], executed by
//! a handler that returns `Result<GpuResponse, GpuError>`, and the result is
//! encoded once (plus, for a `SUBMIT_3D`, whether the compute layer holds
//! its fence). Every id, size, rectangle and memory entry is checked here;
//! what a context does with its submissions is the compute layer's
//! business.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpu_backend::GuestRam;

use super::display::Display;
use super::error::GpuError;
use super::protocol::{
    self, CtrlHdr, CtxCreate, DisplayOne, FORMATS_32BPP, GetCapset, GetCapsetInfo, GpuCommand,
    GpuResponse, MemEntries, PIPE_BUFFER, Rect, ResourceCreate2d, ResourceCreate3d,
    ResourceCreateBlob, SetScanout, SetScanoutBlob, TransferToHost2d, UpdateCursor,
    VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK, VIRTIO_GPU_F_CONTEXT_INIT,
    VIRTIO_GPU_F_RESOURCE_BLOB, VIRTIO_GPU_FLAG_FENCE, VIRTIO_GPU_FLAG_INFO_RING_IDX,
};
use super::resources::{Resource, backing_cost, backing_from, read_backing};
use crate::context_backend::{
    ContextBackend, ContextInit, CtxId, FenceDisposition, FenceRef, GuestBacking, ResourceId,
    ResourceKind,
};

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

/// Host copies of 2D images kept when their resource goes (unref, detach),
/// for the next image of the same size: a fresh allocation of a large
/// image costs a page fault for every 4 KiB on its first write, clearing a
/// kept one a memset. At most [`SPARE_IMAGES`] of them, [`SPARE_IMAGE_BYTES`]
/// in all, outside the guest's image quota (they hold no guest data: they
/// are cleared before reuse).
#[derive(Debug, Default)]
struct ImagePool {
    spare: Vec<Vec<u8>>,
}

/// Images kept at most.
const SPARE_IMAGES: usize = 4;
/// Bytes of kept images at most.
const SPARE_IMAGE_BYTES: usize = 16 << 20;

impl ImagePool {
    /// A zeroed image of `len` bytes.
    fn take(&mut self, len: usize) -> Vec<u8> {
        match self.spare.iter().position(|b| b.len() == len) {
            Some(i) => {
                let mut image = self.spare.swap_remove(i);
                image.fill(0);
                image
            }
            None => vec![0; len],
        }
    }

    /// Keeps `image` if there is room.
    fn give(&mut self, image: Vec<u8>) {
        let kept: usize = self.spare.iter().map(Vec::len).sum();
        if self.spare.len() < SPARE_IMAGES && kept + image.len() <= SPARE_IMAGE_BYTES {
            self.spare.push(image);
        }
    }
}

/// What the queue worker does with a processed control command.
#[derive(Debug)]
pub struct Processed {
    /// The response bytes.
    pub bytes: Vec<u8>,
    /// The request's fence, if it had one.
    pub fence: Option<FenceRef>,
    /// Whether the compute layer holds the fence.
    pub held: bool,
}

/// What is on scanout 0.
#[derive(Clone, Copy, Debug)]
struct Scanout {
    resource: ResourceId,
}

/// The device state of one connection.
pub struct GpuDevice {
    memory: Option<GuestRam>,
    features: u64,
    limits: GpuLimits,
    resources: BTreeMap<ResourceId, Resource>,
    /// Host bytes reserved for 2D image copies.
    image_bytes: u64,
    /// Host copies of images whose resource went, for the next ones.
    images: ImagePool,
    /// Host bytes of backing entry lists.
    backing_bytes: u64,
    /// The backing budget was hit (logged once until usage drops).
    backing_budget_hit: bool,
    contexts: BTreeMap<CtxId, ContextInit>,
    scanout: Option<Scanout>,
    display: Display,
    compute: Box<dyn ContextBackend>,
    counters: Arc<super::stats::GpuCounters>,
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

/// A handler's result.
type Handled = Result<GpuResponse, GpuError>;

impl GpuDevice {
    /// A device with no resources or contexts.
    pub fn new(compute: Box<dyn ContextBackend>, limits: GpuLimits) -> GpuDevice {
        GpuDevice {
            memory: None,
            features: 0,
            limits,
            resources: BTreeMap::new(),
            image_bytes: 0,
            images: ImagePool::default(),
            backing_bytes: 0,
            backing_budget_hit: false,
            contexts: BTreeMap::new(),
            scanout: None,
            display: Display::default(),
            compute,
            counters: Arc::default(),
        }
    }

    /// The control queue's counters (commands by type, errors by code).
    pub fn counters(&self) -> Arc<super::stats::GpuCounters> {
        self.counters.clone()
    }

    /// Features the guest acked.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
    }

    fn acked(&self, feature: u32) -> bool {
        self.features & (1 << feature) != 0
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

    /// Whether the compute layer needs the periodic tick now.
    pub fn wants_tick(&self) -> bool {
        self.compute.wants_tick()
    }

    /// Destroys every context (disconnect).
    pub fn teardown(&mut self) {
        let ctxs: Vec<CtxId> = self.contexts.keys().copied().collect();
        for ctx in ctxs {
            self.compute.destroy_context(ctx);
        }
        self.contexts.clear();
        self.resources.clear();
        self.images = ImagePool::default();
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

    /// Processes one control-queue request.
    pub fn process(&mut self, request: &[u8]) -> Processed {
        let (hdr, body) = match CtrlHdr::decode(request) {
            Ok(split) => split,
            Err(e) => {
                log::debug!("control request: {e}");
                self.counters.count(u32::MAX, Some(e.response_type()));
                let bytes = protocol::encode(&CtrlHdr::default(), &Err(e));
                return Processed {
                    bytes,
                    fence: None,
                    held: false,
                };
            }
        };
        let fence = hdr.has(VIRTIO_GPU_FLAG_FENCE).then_some(FenceRef {
            ctx: CtxId(hdr.ctx_id.to_native()),
            fence_id: hdr.fence_id.to_native(),
            ring_idx: hdr
                .has(VIRTIO_GPU_FLAG_INFO_RING_IDX)
                .then_some(hdr.ring_idx),
        });
        let mut held = false;
        let result = GpuCommand::decode(hdr.type_(), body)
            .and_then(|command| self.execute(&hdr, command, fence, &mut held));
        if let Err(e) = &result {
            log::debug!("{}: {e}", protocol::type_name(hdr.type_()));
        }
        self.counters.count(
            hdr.type_(),
            result.as_ref().err().map(GpuError::response_type),
        );
        Processed {
            bytes: protocol::encode(&hdr, &result),
            fence,
            held,
        }
    }

    fn execute(
        &mut self,
        hdr: &CtrlHdr,
        command: GpuCommand<'_>,
        fence: Option<FenceRef>,
        held: &mut bool,
    ) -> Handled {
        let ctx = CtxId(hdr.ctx_id.to_native());
        match command {
            GpuCommand::GetDisplayInfo => Ok(self.display_info()),
            GpuCommand::GetEdid(e) => self.edid(e.scanout.to_native()),
            GpuCommand::ResourceCreate2d(c) => self.create_2d(&c),
            GpuCommand::ResourceCreate3d(c) => self.create_3d(&c),
            GpuCommand::ResourceCreateBlob(c, entries) => self.create_blob(&c, entries),
            GpuCommand::ResourceUnref(r) => self.unref(ResourceId(r.resource_id.to_native())),
            GpuCommand::SetScanout(s) => self.set_scanout(&s),
            GpuCommand::SetScanoutBlob(s) => self.set_scanout_blob(&s),
            GpuCommand::ResourceFlush(f) => self.flush(ResourceId(f.resource_id.to_native()), f.r),
            GpuCommand::TransferToHost2d(t) => self.transfer_2d(&t),
            GpuCommand::ResourceAttachBacking(a, entries) => {
                self.attach_backing(ResourceId(a.resource_id.to_native()), entries)
            }
            GpuCommand::ResourceDetachBacking(r) => {
                self.detach_backing(ResourceId(r.resource_id.to_native()))
            }
            GpuCommand::GetCapsetInfo(i) => self.capset_info(&i),
            GpuCommand::GetCapset(c) => self.capset(&c),
            GpuCommand::CtxCreate(c) => self.ctx_create(ctx, &c),
            GpuCommand::CtxDestroy => self.ctx_destroy(ctx),
            GpuCommand::CtxAttachResource(r) => {
                self.ctx_attach(ctx, ResourceId(r.resource_id.to_native()))
            }
            GpuCommand::CtxDetachResource(r) => {
                self.ctx_detach(ctx, ResourceId(r.resource_id.to_native()))
            }
            GpuCommand::TransferToHost3d(t) | GpuCommand::TransferFromHost3d(t) => {
                self.transfer_3d(ResourceId(t.resource_id.to_native()))
            }
            GpuCommand::Submit3d(_, commands) => {
                let (response, hold) = self.submit(ctx, commands, fence)?;
                *held = hold;
                Ok(response)
            }
            GpuCommand::ResourceMapBlob(_) | GpuCommand::ResourceUnmapBlob(_) => {
                Err(GpuError::Unsupported {
                    cmd: protocol::type_name(hdr.type_()),
                })
            }
            // Cursor commands belong on the cursor queue.
            GpuCommand::UpdateCursor(_) | GpuCommand::MoveCursor(_) => {
                Err(GpuError::UnknownCommand(hdr.type_()))
            }
        }
    }

    fn memory(&self) -> Result<&GuestRam, GpuError> {
        self.memory.as_ref().ok_or(GpuError::NoMemory)
    }

    fn resource(&self, id: ResourceId) -> Result<&Resource, GpuError> {
        self.resources
            .get(&id)
            .ok_or(GpuError::UnknownResource(id.0))
    }

    fn resource_mut(&mut self, id: ResourceId) -> Result<&mut Resource, GpuError> {
        self.resources
            .get_mut(&id)
            .ok_or(GpuError::UnknownResource(id.0))
    }

    fn context(&self, ctx: CtxId) -> Result<(), GpuError> {
        if self.contexts.contains_key(&ctx) {
            Ok(())
        } else {
            Err(GpuError::UnknownContext(ctx.0))
        }
    }

    fn check_scanout(scanout: u32) -> Result<(), GpuError> {
        if scanout == 0 {
            Ok(())
        } else {
            Err(GpuError::InvalidScanout(scanout))
        }
    }

    fn display_info(&self) -> GpuResponse {
        let (w, h, enabled) = self.display.mode();
        GpuResponse::OkDisplayInfo(vec![DisplayOne {
            r: Rect::new(0, 0, w, h),
            enabled: u32::from(enabled).into(),
            flags: 0.into(),
        }])
    }

    fn edid(&self, scanout: u32) -> Handled {
        Self::check_scanout(scanout)?;
        Ok(GpuResponse::OkEdid(self.display.edid()))
    }

    /// Checks a new resource's id and the resource count.
    fn check_new_resource(&self, id: ResourceId) -> Result<(), GpuError> {
        if id.0 == 0 || self.resources.contains_key(&id) {
            return Err(GpuError::ResourceIdTaken(id.0));
        }
        if self.resources.len() >= self.limits.max_resources as usize {
            return Err(GpuError::TooManyResources {
                max: self.limits.max_resources,
            });
        }
        Ok(())
    }

    fn create_2d(&mut self, c: &ResourceCreate2d) -> Handled {
        let id = ResourceId(c.resource_id.to_native());
        let (width, height) = (c.width.to_native(), c.height.to_native());
        let size = image_bytes(width, height);
        if width == 0 || height == 0 || size > MAX_IMAGE_BYTES {
            return Err(GpuError::ImageSize {
                width,
                height,
                max: MAX_IMAGE_BYTES,
            });
        }
        self.check_new_resource(id)?;
        // The host copy is allocated on the first transfer; its bytes are
        // reserved now, against the guest's total.
        let total = self.image_bytes.saturating_add(size);
        if total > self.limits.max_image_bytes {
            return Err(GpuError::ImageQuota {
                requested: size,
                used: self.image_bytes,
                max: self.limits.max_image_bytes,
            });
        }
        let res = Resource::new(id, ResourceKind::Image2d, width, height, size);
        self.resources.insert(id, res);
        self.image_bytes = total;
        Ok(GpuResponse::OkNoData)
    }

    fn create_3d(&mut self, c: &ResourceCreate3d) -> Handled {
        let id = ResourceId(c.resource_id.to_native());
        let (width, height) = (c.width.to_native(), c.height.to_native());
        let (kind, size) = if c.target.to_native() == PIPE_BUFFER {
            if width == 0 {
                return Err(GpuError::InvalidField {
                    cmd: "RESOURCE_CREATE_3D",
                    field: "width",
                    value: 0,
                });
            }
            (ResourceKind::Buffer3d, u64::from(width))
        } else {
            (ResourceKind::Other3d, 0)
        };
        self.check_new_resource(id)?;
        self.resources
            .insert(id, Resource::new(id, kind, width, height, size));
        Ok(GpuResponse::OkNoData)
    }

    fn create_blob(&mut self, c: &ResourceCreateBlob, entries: MemEntries<'_>) -> Handled {
        if !self.acked(VIRTIO_GPU_F_RESOURCE_BLOB) {
            return Err(GpuError::FeatureNotAcked {
                cmd: "RESOURCE_CREATE_BLOB",
                feature: "VIRTIO_GPU_F_RESOURCE_BLOB",
            });
        }
        let id = ResourceId(c.resource_id.to_native());
        let (blob_mem, size) = (c.blob_mem.to_native(), c.size.to_native());
        let invalid = |field, value| GpuError::InvalidField {
            cmd: "RESOURCE_CREATE_BLOB",
            field,
            value,
        };
        if blob_mem != VIRTIO_GPU_BLOB_MEM_GUEST {
            return Err(invalid("blob_mem", u64::from(blob_mem)));
        }
        if size == 0 {
            return Err(invalid("size", 0));
        }
        self.check_new_resource(id)?;
        let backing = self.backing(id, entries)?;
        if backing.len() < size {
            return Err(GpuError::BackingTooSmall {
                id: id.0,
                need: size,
                have: backing.len(),
            });
        }
        self.charge_backing(id, &backing)?;
        let mut res = Resource::new(id, ResourceKind::BlobGuest, 0, 0, size);
        res.backing = Some(Arc::new(backing));
        self.resources.insert(id, res);
        Ok(GpuResponse::OkNoData)
    }

    /// Checks memory entries against guest RAM and the entry limit.
    fn backing(&self, id: ResourceId, entries: MemEntries<'_>) -> Result<GuestBacking, GpuError> {
        backing_from(entries, self.limits.max_backing_entries, self.memory()?)
            .map_err(|source| GpuError::Backing { id: id.0, source })
    }

    /// Reserves `backing`'s host bytes against the guest's budget.
    fn charge_backing(&mut self, id: ResourceId, backing: &GuestBacking) -> Result<(), GpuError> {
        let bytes = backing_cost(backing);
        let budget = self.limits.max_backing_bytes;
        let total = self.backing_bytes.saturating_add(bytes);
        if total > budget {
            let e = GpuError::BackingBudget {
                id: id.0,
                entries: backing.entries.len(),
                bytes,
                used: self.backing_bytes,
                budget,
            };
            if !std::mem::replace(&mut self.backing_budget_hit, true) {
                log::warn!("{e}: out of memory");
            }
            return Err(e);
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

    fn unref(&mut self, id: ResourceId) -> Handled {
        let contexts = self.resource(id)?.contexts.clone();
        for ctx in contexts {
            self.compute.detach_resource(ctx, id);
        }
        if self.scanout.is_some_and(|s| s.resource == id) {
            self.scanout = None;
            self.display.set_scanout(0, 0);
        }
        if let Some(mut res) = self.resources.remove(&id) {
            if res.kind == ResourceKind::Image2d {
                self.image_bytes = self.image_bytes.saturating_sub(res.size);
            }
            self.refund_backing(res.backing.as_ref());
            if let Some(image) = res.image.take() {
                self.images.give(image);
            }
        }
        Ok(GpuResponse::OkNoData)
    }

    fn set_scanout(&mut self, s: &SetScanout) -> Handled {
        let id = ResourceId(s.resource_id.to_native());
        Self::check_scanout(s.scanout_id.to_native())?;
        if id.0 != 0 {
            let res = self.resource(id)?;
            if !matches!(res.kind, ResourceKind::Image2d | ResourceKind::BlobGuest) {
                return Err(GpuError::WrongKind {
                    cmd: "SET_SCANOUT",
                    id: id.0,
                    kind: res.kind,
                });
            }
        }
        self.scan_out(id, s.r)
    }

    fn set_scanout_blob(&mut self, s: &SetScanoutBlob) -> Handled {
        let id = ResourceId(s.resource_id.to_native());
        Self::check_scanout(s.scanout_id.to_native())?;
        if id.0 != 0 {
            let (width, height) = (s.width.to_native(), s.height.to_native());
            let (format, stride, offset) = (
                s.format.to_native(),
                s.strides[0].to_native(),
                s.offsets[0].to_native(),
            );
            let invalid = |field, value: u32| GpuError::InvalidField {
                cmd: "SET_SCANOUT_BLOB",
                field,
                value: u64::from(value),
            };
            let res = self.resource_mut(id)?;
            if res.kind != ResourceKind::BlobGuest {
                return Err(GpuError::WrongKind {
                    cmd: "SET_SCANOUT_BLOB",
                    id: id.0,
                    kind: res.kind,
                });
            }
            if !FORMATS_32BPP.contains(&format) {
                return Err(invalid("format", format));
            }
            if width == 0 || height == 0 || image_bytes(width, height) > MAX_IMAGE_BYTES {
                return Err(GpuError::ImageSize {
                    width,
                    height,
                    max: MAX_IMAGE_BYTES,
                });
            }
            // One plane of 4-byte pixels inside the blob.
            let row = u64::from(width) * 4;
            if u64::from(stride) < row {
                return Err(invalid("strides[0]", stride));
            }
            let end = u64::from(offset) + u64::from(height - 1) * u64::from(stride) + row;
            if end > res.size {
                return Err(invalid("offsets[0]", offset));
            }
            res.width = width;
            res.height = height;
            res.stride = u64::from(stride);
            res.offset = u64::from(offset);
        }
        self.scan_out(id, s.r)
    }

    /// Shows `rect` of resource `id` (0: nothing) on scanout 0.
    fn scan_out(&mut self, id: ResourceId, rect: Rect) -> Handled {
        if id.0 == 0 {
            self.scanout = None;
            self.display.set_scanout(0, 0);
            return Ok(GpuResponse::OkNoData);
        }
        let res = self.resource(id)?;
        Self::check_rect(res, rect)?;
        self.scanout = Some(Scanout { resource: id });
        self.display
            .set_scanout(rect.width.to_native(), rect.height.to_native());
        Ok(GpuResponse::OkNoData)
    }

    fn check_rect(res: &Resource, rect: Rect) -> Result<(), GpuError> {
        if rect.inside(res.width, res.height) {
            return Ok(());
        }
        let (x, y, w, h) = rect.get();
        Err(GpuError::RectOutside {
            id: res.id.0,
            x,
            y,
            w,
            h,
            width: res.width,
            height: res.height,
        })
    }

    fn transfer_2d(&mut self, t: &TransferToHost2d) -> Handled {
        let id = ResourceId(t.resource_id.to_native());
        let offset = t.offset.to_native();
        let mem = self.memory()?.clone();
        let res = self.resource(id)?;
        if res.kind != ResourceKind::Image2d {
            return Err(GpuError::WrongKind {
                cmd: "TRANSFER_TO_HOST_2D",
                id: id.0,
                kind: res.kind,
            });
        }
        Self::check_rect(res, t.r)?;
        let backing = res.backing.clone().ok_or(GpuError::NoBacking(id.0))?;
        let (x, y, w, h) = t.r.get();
        // Fits in memory: the image is at most MAX_IMAGE_BYTES.
        let stride = u64::from(res.width) * 4;
        let image_len = usize::try_from(stride * u64::from(res.height)).unwrap_or(0);
        let fresh = if res.image.is_none() {
            Some(self.images.take(image_len))
        } else {
            None
        };
        let res = self.resource_mut(id)?;
        let image = res.image.get_or_insert_with(|| fresh.unwrap_or_default());
        let row_len = u64::from(w) * 4;
        let bad_rect = |dst| GpuError::InvalidField {
            cmd: "TRANSFER_TO_HOST_2D",
            field: "r",
            value: dst,
        };
        let read = |dst: u64, src: u64, len: u64, image: &mut Vec<u8>| {
            let line = usize::try_from(dst)
                .ok()
                .zip(usize::try_from(dst + len).ok())
                .and_then(|(a, b)| image.get_mut(a..b))
                .ok_or(bad_rect(dst))?;
            read_backing(&mem, &backing, src, line)
                .map_err(|source| GpuError::Backing { id: id.0, source })
        };
        if x == 0 && row_len == stride {
            // Whole rows: one contiguous range on both sides, one read.
            read(u64::from(y) * stride, offset, u64::from(h) * stride, image)?;
        } else {
            for row in 0..u64::from(h) {
                let src = offset.saturating_add(row * stride);
                let dst = (u64::from(y) + row) * stride + u64::from(x) * 4;
                read(dst, src, row_len, image)?;
            }
        }
        Ok(GpuResponse::OkNoData)
    }

    fn flush(&mut self, id: ResourceId, rect: Rect) -> Handled {
        let res = self.resource(id)?;
        Self::check_rect(res, rect)?;
        if self.scanout.is_some_and(|s| s.resource == id) {
            match self.pixels(res, rect) {
                Ok(pixels) => {
                    let (x, y, w, h) = rect.get();
                    self.display.update(x, y, w, h, pixels);
                }
                Err(e) => log::debug!("RESOURCE_FLUSH of {id:?}: {e}"),
            }
        }
        Ok(GpuResponse::OkNoData)
    }

    /// The pixels of `rect`, from the host copy (2D) or the guest memory
    /// (blob scanout), in a buffer the display reuses.
    fn pixels(&self, res: &Resource, rect: Rect) -> Result<Vec<u8>, GpuError> {
        let (x, y, w, h) = rect.get();
        let row_len = usize::try_from(w).unwrap_or(0).saturating_mul(4);
        let len = row_len.saturating_mul(h as usize);
        let mut out = self
            .display
            .pixel_buffer(len)
            .unwrap_or_else(|| Vec::with_capacity(len));
        let unreadable = |offset| GpuError::Backing {
            id: res.id.0,
            source: super::resources::BackingError::Read {
                offset,
                len: row_len as u64,
            },
        };
        let full_rows = x == 0 && res.offset == 0 && res.stride == u64::from(w) * 4;
        match (&res.image, &res.backing) {
            (Some(image), _) if full_rows => {
                // Whole rows of the host copy: one piece.
                let at = u64::from(y) * res.stride;
                let src = usize::try_from(at)
                    .ok()
                    .and_then(|a| image.get(a..a.checked_add(len)?))
                    .ok_or(unreadable(at))?;
                out.extend_from_slice(src);
            }
            (Some(image), _) => {
                for row in 0..u64::from(h) {
                    let at = res.offset + (u64::from(y) + row) * res.stride + u64::from(x) * 4;
                    let src = usize::try_from(at)
                        .ok()
                        .and_then(|a| image.get(a..a.checked_add(row_len)?))
                        .ok_or(unreadable(at))?;
                    out.extend_from_slice(src);
                }
            }
            (None, Some(b)) if res.kind == ResourceKind::BlobGuest => {
                out.resize(len, 0);
                for (row, line) in out.chunks_exact_mut(row_len.max(1)).enumerate() {
                    let at =
                        res.offset + (u64::from(y) + row as u64) * res.stride + u64::from(x) * 4;
                    read_backing(self.memory()?, b, at, line).map_err(|source| {
                        GpuError::Backing {
                            id: res.id.0,
                            source,
                        }
                    })?;
                }
            }
            _ => return Err(GpuError::NoBacking(res.id.0)),
        }
        Ok(out)
    }

    fn attach_backing(&mut self, id: ResourceId, entries: MemEntries<'_>) -> Handled {
        let res = self.resource(id)?;
        if res.backing.is_some() {
            return Err(GpuError::BackingAttached(id.0));
        }
        let backing = self.backing(id, entries)?;
        self.charge_backing(id, &backing)?;
        let res = self.resource_mut(id)?;
        res.backing = Some(Arc::new(backing));
        let view = res.view();
        for ctx in res.contexts.clone() {
            if let Err(e) = self.compute.attach_resource(ctx, &view) {
                log::debug!("{ctx:?}: attaching backing of {id:?}: {e}");
            }
        }
        Ok(GpuResponse::OkNoData)
    }

    fn detach_backing(&mut self, id: ResourceId) -> Handled {
        let res = self.resource_mut(id)?;
        if res.kind == ResourceKind::BlobGuest {
            return Err(GpuError::BlobBacking(id.0));
        }
        let backing = res.backing.take().ok_or(GpuError::NoBacking(id.0))?;
        let image = res.image.take();
        let contexts = res.contexts.clone();
        if let Some(image) = image {
            self.images.give(image);
        }
        self.refund_backing(Some(&backing));
        for ctx in contexts {
            // The context stops using the pages before the guest gets them
            // back; it sees the resource again on the next attach.
            self.compute.detach_resource(ctx, id);
        }
        Ok(GpuResponse::OkNoData)
    }

    fn capset_info(&self, i: &GetCapsetInfo) -> Handled {
        let index = i.capset_index.to_native();
        let info = usize::try_from(index)
            .ok()
            .and_then(|i| self.compute.capsets().get(i).copied())
            .ok_or(GpuError::CapsetIndex(index))?;
        Ok(GpuResponse::OkCapsetInfo {
            id: info.id,
            max_version: info.max_version,
            max_size: info.max_size,
        })
    }

    fn capset(&self, c: &GetCapset) -> Handled {
        let (id, version) = (c.capset_id.to_native(), c.capset_version.to_native());
        self.compute
            .capset(id, version)
            .map(GpuResponse::OkCapset)
            .ok_or(GpuError::Capset { id, version })
    }

    fn ctx_create(&mut self, ctx: CtxId, c: &CtxCreate) -> Handled {
        if ctx.0 == 0 || self.contexts.contains_key(&ctx) {
            return Err(GpuError::ContextIdTaken(ctx.0));
        }
        let capset = if self.acked(VIRTIO_GPU_F_CONTEXT_INIT) {
            c.context_init.to_native() & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK
        } else {
            0
        };
        let init = ContextInit {
            capset_id: (capset != 0).then_some(capset),
        };
        let name = String::from_utf8_lossy(c.name());
        self.compute
            .create_context(ctx, init, &name)
            .map_err(|source| GpuError::Context { ctx: ctx.0, source })?;
        self.contexts.insert(ctx, init);
        Ok(GpuResponse::OkNoData)
    }

    /// Destroys a context: the compute layer frees everything of it.
    fn ctx_destroy(&mut self, ctx: CtxId) -> Handled {
        self.context(ctx)?;
        self.contexts.remove(&ctx);
        self.compute.destroy_context(ctx);
        for res in self.resources.values_mut() {
            res.contexts.remove(&ctx);
        }
        Ok(GpuResponse::OkNoData)
    }

    fn ctx_attach(&mut self, ctx: CtxId, id: ResourceId) -> Handled {
        self.context(ctx)?;
        let view = self.resource(id)?.view();
        self.compute
            .attach_resource(ctx, &view)
            .map_err(|source| GpuError::Context { ctx: ctx.0, source })?;
        self.resource_mut(id)?.contexts.insert(ctx);
        Ok(GpuResponse::OkNoData)
    }

    fn ctx_detach(&mut self, ctx: CtxId, id: ResourceId) -> Handled {
        self.context(ctx)?;
        if self.resource_mut(id)?.contexts.remove(&ctx) {
            self.compute.detach_resource(ctx, id);
        }
        Ok(GpuResponse::OkNoData)
    }

    fn transfer_3d(&mut self, id: ResourceId) -> Handled {
        if self.resource(id)?.backing.is_none() {
            return Err(GpuError::NoBacking(id.0));
        }
        // The guest backing is the only copy of a buffer: nothing to move.
        Ok(GpuResponse::OkNoData)
    }

    /// `SUBMIT_3D`; also says whether the compute layer holds the fence.
    fn submit(
        &mut self,
        ctx: CtxId,
        commands: &[u8],
        fence: Option<FenceRef>,
    ) -> Result<(GpuResponse, bool), GpuError> {
        self.context(ctx)?;
        let disposition = self
            .compute
            .submit(ctx, commands, fence)
            .map_err(|source| GpuError::Context { ctx: ctx.0, source })?;
        let held = disposition == FenceDisposition::Hold && fence.is_some();
        Ok((GpuResponse::OkNoData, held))
    }
}

impl GpuDevice {
    /// Processes one cursor-queue request (`UPDATE_CURSOR`, `MOVE_CURSOR`).
    /// A request too short for a header gets no response.
    pub fn process_cursor(&mut self, request: &[u8]) -> Vec<u8> {
        let Ok((hdr, body)) = CtrlHdr::decode(request) else {
            return Vec::new();
        };
        let result = match GpuCommand::decode(hdr.type_(), body) {
            Ok(GpuCommand::MoveCursor(c)) => {
                self.display
                    .cursor_move(c.pos.x.to_native(), c.pos.y.to_native());
                Ok(GpuResponse::OkNoData)
            }
            Ok(GpuCommand::UpdateCursor(c)) => {
                self.update_cursor(&c);
                Ok(GpuResponse::OkNoData)
            }
            Ok(_) => Err(GpuError::InvalidField {
                cmd: "cursor queue",
                field: "type",
                value: u64::from(hdr.type_()),
            }),
            // Anything else on the cursor queue is a bad parameter, as before.
            Err(GpuError::UnknownCommand(t)) => Err(GpuError::InvalidField {
                cmd: "cursor queue",
                field: "type",
                value: u64::from(t),
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            log::debug!("{}: {e}", protocol::type_name(hdr.type_()));
        }
        protocol::encode(&hdr, &result)
    }

    fn update_cursor(&mut self, c: &UpdateCursor) {
        let (x, y) = (c.pos.x.to_native(), c.pos.y.to_native());
        let image = self
            .resources
            .get(&ResourceId(c.resource_id.to_native()))
            .filter(|res| res.width == 64 && res.height == 64)
            .and_then(|res| res.image.as_ref())
            .and_then(|img| <&[u8; 16384]>::try_from(img.as_slice()).ok());
        match image {
            Some(img) => {
                self.display
                    .cursor_update(x, y, c.hot_x.to_native(), c.hot_y.to_native(), img)
            }
            None => self.display.cursor_move(x, y),
        }
    }
}

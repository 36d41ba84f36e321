//! virtio-gpu on the wire (virtio 1.3, section 5.7.6).
//!
//! The structures of the control and cursor queues as `#[repr(C)]`
//! little-endian types ([`ByteValued`]), the command, response, feature and
//! flag numbers from `virtio_bindings` (never copied by hand), a request
//! decoded once into a [`GpuCommand`] (header, typed body, and the trailing
//! memory entries or submit payload as borrowed slices), and a response
//! encoded once from a [`GpuResponse`] or a [`GpuError`].
//!
//! Decoding checks sizes only (every structure whole, every count inside
//! the request); what the values mean is the device's business.

use std::mem::size_of;

use vm_memory::{ByteValued, Le32, Le64};

pub use virtio_bindings::virtio_gpu::{
    VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK, VIRTIO_GPU_F_CONTEXT_INIT,
    VIRTIO_GPU_F_EDID, VIRTIO_GPU_F_RESOURCE_BLOB, VIRTIO_GPU_F_VIRGL, VIRTIO_GPU_FLAG_FENCE,
    VIRTIO_GPU_FLAG_INFO_RING_IDX, VIRTIO_GPU_MAX_SCANOUTS,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE as VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_CTX_CREATE as VIRTIO_GPU_CMD_CTX_CREATE,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_CTX_DESTROY as VIRTIO_GPU_CMD_CTX_DESTROY,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE as VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_CAPSET as VIRTIO_GPU_CMD_GET_CAPSET,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_CAPSET_INFO as VIRTIO_GPU_CMD_GET_CAPSET_INFO,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_DISPLAY_INFO as VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_GET_EDID as VIRTIO_GPU_CMD_GET_EDID,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_MOVE_CURSOR as VIRTIO_GPU_CMD_MOVE_CURSOR,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING as VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_CREATE_2D as VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_CREATE_3D as VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB as VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING as VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_FLUSH as VIRTIO_GPU_CMD_RESOURCE_FLUSH,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB as VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB as VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_RESOURCE_UNREF as VIRTIO_GPU_CMD_RESOURCE_UNREF,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_SET_SCANOUT as VIRTIO_GPU_CMD_SET_SCANOUT,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_SET_SCANOUT_BLOB as VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_SUBMIT_3D as VIRTIO_GPU_CMD_SUBMIT_3D,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D as VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D as VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D as VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
    virtio_gpu_ctrl_type_VIRTIO_GPU_CMD_UPDATE_CURSOR as VIRTIO_GPU_CMD_UPDATE_CURSOR,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID as VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER as VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID as VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID as VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY as VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_ERR_UNSPEC as VIRTIO_GPU_RESP_ERR_UNSPEC,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_CAPSET as VIRTIO_GPU_RESP_OK_CAPSET,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_CAPSET_INFO as VIRTIO_GPU_RESP_OK_CAPSET_INFO,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_DISPLAY_INFO as VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_EDID as VIRTIO_GPU_RESP_OK_EDID,
    virtio_gpu_ctrl_type_VIRTIO_GPU_RESP_OK_NODATA as VIRTIO_GPU_RESP_OK_NODATA,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM as VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM as VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM as VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM as VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM as VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM as VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM as VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM,
    virtio_gpu_formats_VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM as VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM,
};

use super::error::GpuError;

/// The formats with 4 bytes per pixel (every `VIRTIO_GPU_FORMAT_*`).
pub const FORMATS_32BPP: [u32; 8] = [
    VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM,
    VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
    VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM,
    VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM,
    VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM,
    VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM,
    VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM,
    VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM,
];

/// `PIPE_BUFFER`, the Gallium target of a 3D buffer resource (not in the
/// virtio spec; Mesa's and virglrenderer's numbering).
pub const PIPE_BUFFER: u32 = 0;

/// Size of an EDID block in `virtio_gpu_resp_edid`.
pub const EDID_BLOCK: usize = 1024;

/// The name of a command or response type, for logs and errors.
pub fn type_name(type_: u32) -> &'static str {
    match type_ {
        VIRTIO_GPU_CMD_GET_DISPLAY_INFO => "GET_DISPLAY_INFO",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => "RESOURCE_CREATE_2D",
        VIRTIO_GPU_CMD_RESOURCE_UNREF => "RESOURCE_UNREF",
        VIRTIO_GPU_CMD_SET_SCANOUT => "SET_SCANOUT",
        VIRTIO_GPU_CMD_RESOURCE_FLUSH => "RESOURCE_FLUSH",
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => "TRANSFER_TO_HOST_2D",
        VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => "RESOURCE_ATTACH_BACKING",
        VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING => "RESOURCE_DETACH_BACKING",
        VIRTIO_GPU_CMD_GET_CAPSET_INFO => "GET_CAPSET_INFO",
        VIRTIO_GPU_CMD_GET_CAPSET => "GET_CAPSET",
        VIRTIO_GPU_CMD_GET_EDID => "GET_EDID",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => "RESOURCE_CREATE_BLOB",
        VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => "SET_SCANOUT_BLOB",
        VIRTIO_GPU_CMD_CTX_CREATE => "CTX_CREATE",
        VIRTIO_GPU_CMD_CTX_DESTROY => "CTX_DESTROY",
        VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE => "CTX_ATTACH_RESOURCE",
        VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => "CTX_DETACH_RESOURCE",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_3D => "RESOURCE_CREATE_3D",
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D => "TRANSFER_TO_HOST_3D",
        VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D => "TRANSFER_FROM_HOST_3D",
        VIRTIO_GPU_CMD_SUBMIT_3D => "SUBMIT_3D",
        VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => "RESOURCE_MAP_BLOB",
        VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => "RESOURCE_UNMAP_BLOB",
        VIRTIO_GPU_CMD_UPDATE_CURSOR => "UPDATE_CURSOR",
        VIRTIO_GPU_CMD_MOVE_CURSOR => "MOVE_CURSOR",
        VIRTIO_GPU_RESP_OK_NODATA => "OK_NODATA",
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO => "OK_DISPLAY_INFO",
        VIRTIO_GPU_RESP_OK_CAPSET_INFO => "OK_CAPSET_INFO",
        VIRTIO_GPU_RESP_OK_CAPSET => "OK_CAPSET",
        VIRTIO_GPU_RESP_OK_EDID => "OK_EDID",
        VIRTIO_GPU_RESP_ERR_UNSPEC => "ERR_UNSPEC",
        VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY => "ERR_OUT_OF_MEMORY",
        VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID => "ERR_INVALID_SCANOUT_ID",
        VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID => "ERR_INVALID_RESOURCE_ID",
        VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID => "ERR_INVALID_CONTEXT_ID",
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER => "ERR_INVALID_PARAMETER",
        _ => "unknown",
    }
}

/// Declares wire structures: `#[repr(C)]`, `ByteValued`, and a size check
/// against the virtio spec.
macro_rules! wire {
    ($( $(#[$meta:meta])* $name:ident ($size:expr) { $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)? } )*) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
            pub struct $name {
                $( $(#[$fmeta])* pub $field: $ty, )*
            }

            // SAFETY: a `#[repr(C)]` struct of little-endian integers (and
            // arrays of them) whose fields leave no padding (the size is
            // checked below against the sum the spec gives): every bit
            // pattern is a valid value.
            unsafe impl ByteValued for $name {}

            const _: () = assert!(size_of::<$name>() == $size);
        )*
    };
}

wire! {
    /// `virtio_gpu_ctrl_hdr`.
    CtrlHdr(24) {
        /// Command or response type.
        type_: Le32,
        /// `VIRTIO_GPU_FLAG_*`.
        flags: Le32,
        /// Fence id, with `VIRTIO_GPU_FLAG_FENCE`.
        fence_id: Le64,
        /// Context id (3D commands).
        ctx_id: Le32,
        /// Ring index, with `VIRTIO_GPU_FLAG_INFO_RING_IDX`.
        ring_idx: u8,
        /// Padding.
        padding: [u8; 3],
    }

    /// `virtio_gpu_rect`.
    Rect(16) {
        /// Left.
        x: Le32,
        /// Top.
        y: Le32,
        /// Width.
        width: Le32,
        /// Height.
        height: Le32,
    }

    /// `virtio_gpu_resource_create_2d`.
    ResourceCreate2d(16) {
        /// The new resource.
        resource_id: Le32,
        /// `VIRTIO_GPU_FORMAT_*`.
        format: Le32,
        /// Width in pixels.
        width: Le32,
        /// Height in pixels.
        height: Le32,
    }

    /// `virtio_gpu_resource_unref`, `virtio_gpu_resource_detach_backing`,
    /// `virtio_gpu_ctx_resource` and `virtio_gpu_resource_unmap_blob`: a
    /// resource id and padding.
    ResourceRef(8) {
        /// The resource.
        resource_id: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_set_scanout`.
    SetScanout(24) {
        /// The part of the resource shown.
        r: Rect,
        /// The scanout.
        scanout_id: Le32,
        /// The resource, 0 to disable the scanout.
        resource_id: Le32,
    }

    /// `virtio_gpu_resource_flush`.
    ResourceFlush(24) {
        /// The part that changed.
        r: Rect,
        /// The resource.
        resource_id: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_transfer_to_host_2d`.
    TransferToHost2d(32) {
        /// The part of the image to copy.
        r: Rect,
        /// Byte offset of the rectangle in the backing.
        offset: Le64,
        /// The resource.
        resource_id: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_resource_attach_backing`, followed by `nr_entries`
    /// [`MemEntry`]s.
    ResourceAttachBacking(8) {
        /// The resource.
        resource_id: Le32,
        /// Entries that follow.
        nr_entries: Le32,
    }

    /// `virtio_gpu_mem_entry`.
    MemEntry(16) {
        /// Guest-physical address.
        addr: Le64,
        /// Length in bytes.
        length: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_display_one`.
    DisplayOne(24) {
        /// The mode.
        r: Rect,
        /// Whether the scanout is enabled.
        enabled: Le32,
        /// Flags.
        flags: Le32,
    }

    /// `virtio_gpu_get_capset_info`.
    GetCapsetInfo(8) {
        /// Index of the capset.
        capset_index: Le32,
        /// Padding.
        padding: Le32,
    }

    /// The body of `virtio_gpu_resp_capset_info`.
    CapsetInfoBody(16) {
        /// Capset id.
        capset_id: Le32,
        /// Highest version.
        capset_max_version: Le32,
        /// Payload size.
        capset_max_size: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_get_capset`.
    GetCapset(8) {
        /// Capset id.
        capset_id: Le32,
        /// Version.
        capset_version: Le32,
    }

    /// `virtio_gpu_cmd_get_edid`.
    GetEdid(8) {
        /// The scanout.
        scanout: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_box`.
    Box3d(24) {
        /// Left.
        x: Le32,
        /// Top.
        y: Le32,
        /// Front.
        z: Le32,
        /// Width.
        w: Le32,
        /// Height.
        h: Le32,
        /// Depth.
        d: Le32,
    }

    /// `virtio_gpu_transfer_host_3d`.
    TransferHost3d(48) {
        /// The box to move.
        box_: Box3d,
        /// Byte offset in the backing.
        offset: Le64,
        /// The resource.
        resource_id: Le32,
        /// Mip level.
        level: Le32,
        /// Row stride.
        stride: Le32,
        /// Layer stride.
        layer_stride: Le32,
    }

    /// `virtio_gpu_resource_create_3d`.
    ResourceCreate3d(48) {
        /// The new resource.
        resource_id: Le32,
        /// Gallium target (`PIPE_BUFFER`, textures).
        target: Le32,
        /// Format.
        format: Le32,
        /// Bind flags.
        bind: Le32,
        /// Width (bytes, for a buffer).
        width: Le32,
        /// Height.
        height: Le32,
        /// Depth.
        depth: Le32,
        /// Array size.
        array_size: Le32,
        /// Last mip level.
        last_level: Le32,
        /// Samples.
        nr_samples: Le32,
        /// Flags.
        flags: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_cmd_submit`, followed by `num_in_fences` fence ids and
    /// `size` bytes of commands.
    CmdSubmit(8) {
        /// Bytes of commands.
        size: Le32,
        /// In-fences (u64 each) before the commands.
        num_in_fences: Le32,
    }

    /// `virtio_gpu_resource_create_blob`, followed by `nr_entries`
    /// [`MemEntry`]s.
    ResourceCreateBlob(32) {
        /// The new resource.
        resource_id: Le32,
        /// `VIRTIO_GPU_BLOB_MEM_*`.
        blob_mem: Le32,
        /// `VIRTIO_GPU_BLOB_FLAG_*`.
        blob_flags: Le32,
        /// Entries that follow.
        nr_entries: Le32,
        /// Host blob id.
        blob_id: Le64,
        /// Size in bytes.
        size: Le64,
    }

    /// `virtio_gpu_set_scanout_blob`.
    SetScanoutBlob(72) {
        /// The part of the blob shown.
        r: Rect,
        /// The scanout.
        scanout_id: Le32,
        /// The blob, 0 to disable the scanout.
        resource_id: Le32,
        /// Width in pixels.
        width: Le32,
        /// Height in pixels.
        height: Le32,
        /// `VIRTIO_GPU_FORMAT_*`.
        format: Le32,
        /// Padding.
        padding: Le32,
        /// Row strides of up to four planes.
        strides: [Le32; 4],
        /// Offsets of up to four planes.
        offsets: [Le32; 4],
    }

    /// `virtio_gpu_resource_map_blob`.
    ResourceMapBlob(16) {
        /// The resource.
        resource_id: Le32,
        /// Padding.
        padding: Le32,
        /// Offset in the host visible region.
        offset: Le64,
    }

    /// `virtio_gpu_cursor_pos`.
    CursorPos(16) {
        /// The scanout.
        scanout_id: Le32,
        /// Left.
        x: Le32,
        /// Top.
        y: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_update_cursor` (both cursor commands).
    UpdateCursor(32) {
        /// Position.
        pos: CursorPos,
        /// The cursor image (update only).
        resource_id: Le32,
        /// Hot spot (update only).
        hot_x: Le32,
        /// Hot spot (update only).
        hot_y: Le32,
        /// Padding.
        padding: Le32,
    }

    /// `virtio_gpu_config`, the device config space.
    VirtioGpuConfig(16) {
        /// Events pending for the driver.
        events_read: Le32,
        /// Events the driver clears.
        events_clear: Le32,
        /// Scanouts.
        num_scanouts: Le32,
        /// Capsets.
        num_capsets: Le32,
    }
}

/// `virtio_gpu_ctx_create`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtxCreate {
    /// Bytes of `debug_name` used.
    pub nlen: Le32,
    /// Capset id (low 8 bits) with `VIRTIO_GPU_F_CONTEXT_INIT`.
    pub context_init: Le32,
    /// A name for logs.
    pub debug_name: [u8; 64],
}

// SAFETY: a `#[repr(C)]` struct of two little-endian integers and a byte
// array, without padding (size checked below): every bit pattern is valid.
unsafe impl ByteValued for CtxCreate {}

const _: () = assert!(size_of::<CtxCreate>() == 72);

impl Default for CtxCreate {
    fn default() -> CtxCreate {
        CtxCreate {
            nlen: Le32::default(),
            context_init: Le32::default(),
            debug_name: [0; 64],
        }
    }
}

impl CtxCreate {
    /// The debug name, as far as `nlen` says.
    pub fn name(&self) -> &[u8] {
        let n = usize::try_from(self.nlen.to_native()).unwrap_or(usize::MAX);
        self.debug_name.get(..n.min(64)).unwrap_or_default()
    }
}

impl CtrlHdr {
    /// A header of `type_` with nothing else.
    pub fn new(type_: u32) -> CtrlHdr {
        CtrlHdr {
            type_: type_.into(),
            ..CtrlHdr::default()
        }
    }

    /// Splits a request into its header and body.
    pub fn decode(request: &[u8]) -> Result<(CtrlHdr, &[u8]), GpuError> {
        read::<CtrlHdr>(request).ok_or(GpuError::NoHeader { len: request.len() })
    }

    /// The command or response type.
    pub fn type_(&self) -> u32 {
        self.type_.to_native()
    }

    /// Whether `flag` (`VIRTIO_GPU_FLAG_*`) is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags.to_native() & flag != 0
    }

    /// The header of the response to a request with this header: the fence
    /// and ring index are echoed.
    pub fn response(&self, type_: u32) -> CtrlHdr {
        let echo = VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX;
        CtrlHdr {
            type_: type_.into(),
            flags: (self.flags.to_native() & echo).into(),
            fence_id: self.fence_id,
            ctx_id: self.ctx_id,
            ring_idx: self.ring_idx,
            padding: [0; 3],
        }
    }
}

impl Rect {
    /// A rectangle.
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x: x.into(),
            y: y.into(),
            width: width.into(),
            height: height.into(),
        }
    }

    /// `(x, y, width, height)` in native integers.
    pub fn get(&self) -> (u32, u32, u32, u32) {
        (
            self.x.to_native(),
            self.y.to_native(),
            self.width.to_native(),
            self.height.to_native(),
        )
    }

    /// Whether the rectangle lies inside a `width` x `height` image.
    pub fn inside(&self, width: u32, height: u32) -> bool {
        let (x, y, w, h) = self.get();
        x.checked_add(w).is_some_and(|r| r <= width)
            && y.checked_add(h).is_some_and(|b| b <= height)
    }
}

/// Copies a `T` off the front of `bytes`; returns it and the rest.
fn read<T: ByteValued + Default>(bytes: &[u8]) -> Option<(T, &[u8])> {
    let (head, rest) = bytes.split_at_checked(size_of::<T>())?;
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(head);
    Some((v, rest))
}

/// The memory entries that follow an `ATTACH_BACKING` or `CREATE_BLOB`,
/// borrowed from the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntries<'a> {
    bytes: &'a [u8],
}

impl<'a> MemEntries<'a> {
    /// `count` entries at the front of `bytes`, if they are all there.
    pub fn take(bytes: &'a [u8], count: u32) -> Option<MemEntries<'a>> {
        let n = usize::try_from(count)
            .ok()?
            .checked_mul(size_of::<MemEntry>())?;
        bytes.get(..n).map(|bytes| MemEntries { bytes })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.bytes.len() / size_of::<MemEntry>()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = MemEntry> + 'a {
        self.bytes
            .chunks_exact(size_of::<MemEntry>())
            .filter_map(|b| read::<MemEntry>(b).map(|(e, _)| e))
    }
}

/// A control or cursor request, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuCommand<'a> {
    /// `GET_DISPLAY_INFO`.
    GetDisplayInfo,
    /// `RESOURCE_CREATE_2D`.
    ResourceCreate2d(ResourceCreate2d),
    /// `RESOURCE_UNREF`.
    ResourceUnref(ResourceRef),
    /// `SET_SCANOUT`.
    SetScanout(SetScanout),
    /// `RESOURCE_FLUSH`.
    ResourceFlush(ResourceFlush),
    /// `TRANSFER_TO_HOST_2D`.
    TransferToHost2d(TransferToHost2d),
    /// `RESOURCE_ATTACH_BACKING` and its entries.
    ResourceAttachBacking(ResourceAttachBacking, MemEntries<'a>),
    /// `RESOURCE_DETACH_BACKING`.
    ResourceDetachBacking(ResourceRef),
    /// `GET_CAPSET_INFO`.
    GetCapsetInfo(GetCapsetInfo),
    /// `GET_CAPSET`.
    GetCapset(GetCapset),
    /// `GET_EDID`.
    GetEdid(GetEdid),
    /// `RESOURCE_CREATE_BLOB` and its entries.
    ResourceCreateBlob(ResourceCreateBlob, MemEntries<'a>),
    /// `SET_SCANOUT_BLOB`.
    SetScanoutBlob(SetScanoutBlob),
    /// `CTX_CREATE`.
    CtxCreate(CtxCreate),
    /// `CTX_DESTROY`.
    CtxDestroy,
    /// `CTX_ATTACH_RESOURCE`.
    CtxAttachResource(ResourceRef),
    /// `CTX_DETACH_RESOURCE`.
    CtxDetachResource(ResourceRef),
    /// `RESOURCE_CREATE_3D`.
    ResourceCreate3d(ResourceCreate3d),
    /// `TRANSFER_TO_HOST_3D`.
    TransferToHost3d(TransferHost3d),
    /// `TRANSFER_FROM_HOST_3D`.
    TransferFromHost3d(TransferHost3d),
    /// `SUBMIT_3D` and its command bytes (the in-fences are skipped).
    Submit3d(CmdSubmit, &'a [u8]),
    /// `RESOURCE_MAP_BLOB`.
    ResourceMapBlob(ResourceMapBlob),
    /// `RESOURCE_UNMAP_BLOB`.
    ResourceUnmapBlob(ResourceRef),
    /// `UPDATE_CURSOR`.
    UpdateCursor(UpdateCursor),
    /// `MOVE_CURSOR`.
    MoveCursor(UpdateCursor),
}

impl<'a> GpuCommand<'a> {
    /// Decodes the body of a request of type `type_`. Bytes after the
    /// command are ignored (the spec lets drivers send longer buffers).
    pub fn decode(type_: u32, body: &'a [u8]) -> Result<GpuCommand<'a>, GpuError> {
        fn get<T: ByteValued + Default>(type_: u32, body: &[u8]) -> Result<(T, &[u8]), GpuError> {
            read::<T>(body).ok_or(GpuError::ShortRequest {
                cmd: type_name(type_),
                need: size_of::<T>(),
                got: body.len(),
            })
        }
        let short = |need: usize| GpuError::ShortRequest {
            cmd: type_name(type_),
            need,
            got: body.len(),
        };
        Ok(match type_ {
            VIRTIO_GPU_CMD_GET_DISPLAY_INFO => GpuCommand::GetDisplayInfo,
            VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => GpuCommand::ResourceCreate2d(get(type_, body)?.0),
            VIRTIO_GPU_CMD_RESOURCE_UNREF => GpuCommand::ResourceUnref(get(type_, body)?.0),
            VIRTIO_GPU_CMD_SET_SCANOUT => GpuCommand::SetScanout(get(type_, body)?.0),
            VIRTIO_GPU_CMD_RESOURCE_FLUSH => GpuCommand::ResourceFlush(get(type_, body)?.0),
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => GpuCommand::TransferToHost2d(get(type_, body)?.0),
            VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => {
                let (a, rest): (ResourceAttachBacking, _) = get(type_, body)?;
                let nr = a.nr_entries.to_native();
                let entries = MemEntries::take(rest, nr).ok_or_else(|| {
                    short(
                        size_of::<ResourceAttachBacking>()
                            .saturating_add((nr as usize).saturating_mul(size_of::<MemEntry>())),
                    )
                })?;
                GpuCommand::ResourceAttachBacking(a, entries)
            }
            VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING => {
                GpuCommand::ResourceDetachBacking(get(type_, body)?.0)
            }
            VIRTIO_GPU_CMD_GET_CAPSET_INFO => GpuCommand::GetCapsetInfo(get(type_, body)?.0),
            VIRTIO_GPU_CMD_GET_CAPSET => GpuCommand::GetCapset(get(type_, body)?.0),
            VIRTIO_GPU_CMD_GET_EDID => GpuCommand::GetEdid(get(type_, body)?.0),
            VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => {
                let (b, rest): (ResourceCreateBlob, _) = get(type_, body)?;
                let nr = b.nr_entries.to_native();
                let entries = MemEntries::take(rest, nr).ok_or_else(|| {
                    short(
                        size_of::<ResourceCreateBlob>()
                            .saturating_add((nr as usize).saturating_mul(size_of::<MemEntry>())),
                    )
                })?;
                GpuCommand::ResourceCreateBlob(b, entries)
            }
            VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => GpuCommand::SetScanoutBlob(get(type_, body)?.0),
            VIRTIO_GPU_CMD_CTX_CREATE => GpuCommand::CtxCreate(get(type_, body)?.0),
            VIRTIO_GPU_CMD_CTX_DESTROY => GpuCommand::CtxDestroy,
            VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE => {
                GpuCommand::CtxAttachResource(get(type_, body)?.0)
            }
            VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => {
                GpuCommand::CtxDetachResource(get(type_, body)?.0)
            }
            VIRTIO_GPU_CMD_RESOURCE_CREATE_3D => GpuCommand::ResourceCreate3d(get(type_, body)?.0),
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D => GpuCommand::TransferToHost3d(get(type_, body)?.0),
            VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D => {
                GpuCommand::TransferFromHost3d(get(type_, body)?.0)
            }
            VIRTIO_GPU_CMD_SUBMIT_3D => {
                let (s, rest): (CmdSubmit, _) = get(type_, body)?;
                let fences = (s.num_in_fences.to_native() as usize).saturating_mul(8);
                let size = s.size.to_native() as usize;
                let commands = fences
                    .checked_add(size)
                    .and_then(|end| rest.get(fences..end))
                    .ok_or_else(|| {
                        short(
                            size_of::<CmdSubmit>()
                                .saturating_add(fences)
                                .saturating_add(size),
                        )
                    })?;
                GpuCommand::Submit3d(s, commands)
            }
            VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => GpuCommand::ResourceMapBlob(get(type_, body)?.0),
            VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => {
                GpuCommand::ResourceUnmapBlob(get(type_, body)?.0)
            }
            VIRTIO_GPU_CMD_UPDATE_CURSOR => GpuCommand::UpdateCursor(get(type_, body)?.0),
            VIRTIO_GPU_CMD_MOVE_CURSOR => GpuCommand::MoveCursor(get(type_, body)?.0),
            other => return Err(GpuError::UnknownCommand(other)),
        })
    }
}

/// A successful response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuResponse {
    /// `OK_NODATA`.
    OkNoData,
    /// `OK_DISPLAY_INFO`: the modes of the scanouts (the rest disabled).
    OkDisplayInfo(Vec<DisplayOne>),
    /// `OK_CAPSET_INFO`.
    OkCapsetInfo {
        /// Capset id.
        id: u32,
        /// Highest version.
        max_version: u32,
        /// Payload size.
        max_size: u32,
    },
    /// `OK_CAPSET` and its payload.
    OkCapset(Vec<u8>),
    /// `OK_EDID` and the EDID (at most [`EDID_BLOCK`] bytes).
    OkEdid(Vec<u8>),
}

impl GpuResponse {
    /// The response type.
    pub fn type_(&self) -> u32 {
        match self {
            GpuResponse::OkNoData => VIRTIO_GPU_RESP_OK_NODATA,
            GpuResponse::OkDisplayInfo(_) => VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
            GpuResponse::OkCapsetInfo { .. } => VIRTIO_GPU_RESP_OK_CAPSET_INFO,
            GpuResponse::OkCapset(_) => VIRTIO_GPU_RESP_OK_CAPSET,
            GpuResponse::OkEdid(_) => VIRTIO_GPU_RESP_OK_EDID,
        }
    }

    /// The wire form of the response to a request with header `req`.
    pub fn encode(&self, req: &CtrlHdr) -> Vec<u8> {
        let mut out = req.response(self.type_()).as_slice().to_vec();
        match self {
            GpuResponse::OkNoData => {}
            GpuResponse::OkDisplayInfo(modes) => {
                let none = DisplayOne::default();
                for i in 0..VIRTIO_GPU_MAX_SCANOUTS as usize {
                    out.extend_from_slice(modes.get(i).unwrap_or(&none).as_slice());
                }
            }
            GpuResponse::OkCapsetInfo {
                id,
                max_version,
                max_size,
            } => {
                let body = CapsetInfoBody {
                    capset_id: (*id).into(),
                    capset_max_version: (*max_version).into(),
                    capset_max_size: (*max_size).into(),
                    padding: 0.into(),
                };
                out.extend_from_slice(body.as_slice());
            }
            GpuResponse::OkCapset(data) => out.extend_from_slice(data),
            GpuResponse::OkEdid(edid) => {
                let n = edid.len().min(EDID_BLOCK);
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                let start = out.len();
                out.resize(start + EDID_BLOCK, 0);
                if let (Some(dst), Some(src)) = (out.get_mut(start..start + n), edid.get(..n)) {
                    dst.copy_from_slice(src);
                }
            }
        }
        out
    }
}

/// The wire form of the response to a request with header `req`: the
/// response, or the error's `VIRTIO_GPU_RESP_ERR_*` header.
pub fn encode(req: &CtrlHdr, result: &Result<GpuResponse, GpuError>) -> Vec<u8> {
    match result {
        Ok(response) => response.encode(req),
        Err(e) => req.response(e.response_type()).as_slice().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(type_: u32, body: &[u32]) -> Vec<u8> {
        let mut hdr = CtrlHdr::new(type_);
        hdr.flags = (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX | 0x80).into();
        hdr.fence_id = 9.into();
        hdr.ctx_id = 3.into();
        hdr.ring_idx = 1;
        let mut v = hdr.as_slice().to_vec();
        for f in body {
            v.extend_from_slice(&f.to_le_bytes());
        }
        v
    }

    #[test]
    fn headers_decode_and_responses_echo_fence_and_ring() {
        let req = request(VIRTIO_GPU_CMD_RESOURCE_UNREF, &[7, 0]);
        let (hdr, body) = CtrlHdr::decode(&req).unwrap();
        assert_eq!(hdr.type_(), VIRTIO_GPU_CMD_RESOURCE_UNREF);
        assert_eq!(hdr.fence_id.to_native(), 9);
        assert_eq!(body.len(), 8);
        let resp = GpuResponse::OkNoData.encode(&hdr);
        assert_eq!(resp.len(), 24);
        let (r, _) = CtrlHdr::decode(&resp).unwrap();
        assert_eq!(r.type_(), VIRTIO_GPU_RESP_OK_NODATA);
        assert_eq!(
            r.flags.to_native(),
            VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX
        );
        assert_eq!(
            (r.fence_id.to_native(), r.ctx_id.to_native(), r.ring_idx),
            (9, 3, 1)
        );
        assert_eq!(
            CtrlHdr::decode(&req[..23]).unwrap_err(),
            GpuError::NoHeader { len: 23 }
        );
    }

    #[test]
    fn bodies_are_checked_for_size() {
        let body = [7u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        assert_eq!(
            GpuCommand::decode(VIRTIO_GPU_CMD_RESOURCE_UNREF, &body).unwrap(),
            GpuCommand::ResourceUnref(ResourceRef {
                resource_id: 7.into(),
                padding: 0.into()
            })
        );
        assert_eq!(
            GpuCommand::decode(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, &body).unwrap_err(),
            GpuError::ShortRequest {
                cmd: "RESOURCE_CREATE_2D",
                need: 16,
                got: 8
            }
        );
        assert_eq!(
            GpuCommand::decode(0x999, &body).unwrap_err(),
            GpuError::UnknownCommand(0x999)
        );
    }

    #[test]
    fn trailing_entries_and_payloads_are_borrowed_and_bounded() {
        let mut body = Vec::new();
        body.extend_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        for (addr, len) in [(0x1000u64, 0x1000u32), (0x8000, 0x10)] {
            body.extend_from_slice(&addr.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
        }
        let GpuCommand::ResourceAttachBacking(a, entries) =
            GpuCommand::decode(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, &body).unwrap()
        else {
            panic!("attach");
        };
        assert_eq!(a.resource_id.to_native(), 5);
        let got: Vec<(u64, u32)> = entries
            .iter()
            .map(|e| (e.addr.to_native(), e.length.to_native()))
            .collect();
        assert_eq!(got, vec![(0x1000, 0x1000), (0x8000, 0x10)]);
        // More entries announced than sent; a count that overflows.
        body[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            GpuCommand::decode(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, &body),
            Err(GpuError::ShortRequest { need: 56, .. })
        ));
        body[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(GpuCommand::decode(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, &body).is_err());

        // SUBMIT_3D: one in-fence skipped, then the commands.
        let mut s = Vec::new();
        s.extend_from_slice(&3u32.to_le_bytes());
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend_from_slice(&77u64.to_le_bytes());
        s.extend_from_slice(&[1, 2, 3, 4]);
        let GpuCommand::Submit3d(_, commands) =
            GpuCommand::decode(VIRTIO_GPU_CMD_SUBMIT_3D, &s).unwrap()
        else {
            panic!("submit");
        };
        assert_eq!(commands, &[1, 2, 3]);
        s[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(GpuCommand::decode(VIRTIO_GPU_CMD_SUBMIT_3D, &s).is_err());
    }

    #[test]
    fn responses_have_their_spec_sizes() {
        let hdr = CtrlHdr::new(VIRTIO_GPU_CMD_GET_DISPLAY_INFO);
        let info = GpuResponse::OkDisplayInfo(vec![DisplayOne {
            r: Rect::new(0, 0, 1024, 768),
            enabled: 1.into(),
            flags: 0.into(),
        }]);
        let b = info.encode(&hdr);
        assert_eq!(b.len(), 24 + 16 * 24);
        assert_eq!(&b[32..36], &1024u32.to_le_bytes());
        let b = GpuResponse::OkEdid(vec![0xAB; 2000]).encode(&hdr);
        assert_eq!(b.len(), 24 + 8 + 1024);
        assert_eq!(&b[24..28], &1024u32.to_le_bytes());
        let b = GpuResponse::OkCapsetInfo {
            id: 24,
            max_version: 1,
            max_size: 128,
        }
        .encode(&hdr);
        assert_eq!(b.len(), 40);
        let e = encode(&hdr, &Err(GpuError::InvalidScanout(3)));
        assert_eq!(
            &e[..4],
            &VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID.to_le_bytes()
        );
    }

    #[test]
    fn rects_are_checked_without_overflow() {
        assert!(!Rect::new(u32::MAX, 0, 2, 1).inside(100, 100));
        assert!(Rect::new(10, 10, 90, 90).inside(100, 100));
        assert!(!Rect::new(10, 10, 91, 90).inside(100, 100));
    }
}

//! The scanout: display info, EDID, and pixels for QEMU's display.
//!
//! With QEMU's `vhost-user-gpu-pci` the daemon has no window of its own: it
//! sends scanout and update messages over the GPU socket QEMU hands it
//! (`VHOST_USER_GPU_SET_SOCKET`), and QEMU shows them. Without a socket
//! (crosvm, tests) the scanout is still tracked and answered.

use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuEdidRequest, VhostUserGpuScanout,
    VhostUserGpuUpdate,
};

use super::wire::Rect;

/// The default mode when the frontend does not say.
pub const DEFAULT_WIDTH: u32 = 1024;
/// The default mode when the frontend does not say.
pub const DEFAULT_HEIGHT: u32 = 768;

/// The display side of the device.
#[derive(Default)]
pub struct Display {
    socket: Option<GpuBackend>,
}

impl std::fmt::Debug for Display {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Display")
            .field("socket", &self.socket.is_some())
            .finish()
    }
}

impl Display {
    /// QEMU gave us its GPU socket.
    pub fn set_socket(&mut self, socket: GpuBackend) {
        self.socket = Some(socket);
    }

    /// The mode of scanout 0: asked from the frontend when it has a socket.
    pub fn mode(&self) -> (u32, u32, bool) {
        if let Some(s) = &self.socket {
            match s.get_display_info() {
                Ok(info) => {
                    let one = info.pmodes[0];
                    if one.r.width > 0 && one.r.height > 0 {
                        return (one.r.width, one.r.height, one.enabled != 0);
                    }
                }
                Err(e) => log::debug!("GPU socket display info: {e}"),
            }
        }
        (DEFAULT_WIDTH, DEFAULT_HEIGHT, true)
    }

    /// The EDID of scanout 0: the frontend's, else one we build.
    pub fn edid(&self) -> Vec<u8> {
        if let Some(s) = &self.socket {
            if let Ok(r) = s.get_edid(&VhostUserGpuEdidRequest { scanout_id: 0 }) {
                let n = (r.size as usize).min(r.edid.len());
                if n >= 128 {
                    return r.edid[..n].to_vec();
                }
            }
        }
        let (w, h, _) = self.mode();
        build_edid(w, h).to_vec()
    }

    /// A resource of `width` x `height` now shows on scanout 0 (or nothing).
    pub fn set_scanout(&self, width: u32, height: u32) {
        if let Some(s) = &self.socket {
            let m = VhostUserGpuScanout {
                scanout_id: 0,
                width,
                height,
            };
            if let Err(e) = s.set_scanout(&m) {
                log::debug!("GPU socket scanout: {e}");
            }
        }
    }

    /// New pixels (4 bytes each, rows of `rect.width`) for `rect`.
    pub fn update(&self, rect: Rect, pixels: &[u8]) {
        if let Some(s) = &self.socket {
            let u = VhostUserGpuUpdate {
                scanout_id: 0,
                x: rect.x,
                y: rect.y,
                width: rect.width,
                height: rect.height,
            };
            if let Err(e) = s.update_scanout(&u, pixels) {
                log::debug!("GPU socket update: {e}");
            }
        }
    }

    /// Moves the cursor.
    pub fn cursor_move(&self, x: u32, y: u32) {
        if let Some(s) = &self.socket {
            let _ = s.cursor_pos(&VhostUserGpuCursorPos {
                scanout_id: 0,
                x,
                y,
            });
        }
    }

    /// A new 64x64 cursor image.
    pub fn cursor_update(&self, x: u32, y: u32, hot_x: u32, hot_y: u32, image: &[u8; 16384]) {
        if let Some(s) = &self.socket {
            let u = VhostUserGpuCursorUpdate {
                pos: VhostUserGpuCursorPos {
                    scanout_id: 0,
                    x,
                    y,
                },
                hot_x,
                hot_y,
            };
            let _ = s.cursor_update(&u, image);
        }
    }
}

/// A 128-byte EDID 1.4 block with one detailed timing for `width` x
/// `height` at 60 Hz (CVT-like blanking) and a valid checksum.
pub fn build_edid(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[..8].copy_from_slice(&[0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00]);
    // Manufacturer "VGN" (5-bit letters), product 1, serial 0.
    let m = ((b'V' - b'@') as u16) << 10 | ((b'G' - b'@') as u16) << 5 | (b'N' - b'@') as u16;
    e[8..10].copy_from_slice(&m.to_be_bytes());
    e[10] = 1;
    e[16] = 1; // week
    e[17] = 36; // year 2026
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xA5; // digital, 8 bpc, DisplayPort
    e[21] = 34; // 34 x 19 cm
    e[22] = 19;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, preferred timing is native
    // Detailed timing descriptor.
    let (hblank, vblank) = (160u32, 30u32);
    let clock = (width + hblank) * (height + vblank) * 60 / 10_000; // 10 kHz units
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&(clock.min(0xFFFF) as u16).to_le_bytes());
    d[2] = (width & 0xFF) as u8;
    d[3] = (hblank & 0xFF) as u8;
    d[4] = (((width >> 8) & 0xF) << 4 | ((hblank >> 8) & 0xF)) as u8;
    d[5] = (height & 0xFF) as u8;
    d[6] = (vblank & 0xFF) as u8;
    d[7] = (((height >> 8) & 0xF) << 4 | ((vblank >> 8) & 0xF)) as u8;
    d[8] = 48; // hsync offset
    d[9] = 32; // hsync width
    d[10] = (3 << 4) | 5; // vsync offset, width
    d[17] = 0x1E; // digital separate sync
    // Display name descriptor.
    let n = &mut e[72..90];
    n[3] = 0xFC;
    n[5..18].copy_from_slice(b"vhost-gpu-nc\n");
    for block in [90usize, 108] {
        e[block + 3] = 0x10; // dummy descriptor
    }
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edid_has_header_mode_and_checksum() {
        let e = build_edid(1024, 768);
        assert_eq!(&e[..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u32::from(e[56]) | (u32::from(e[58] >> 4) << 8), 1024);
        assert_eq!(u32::from(e[59]) | (u32::from(e[61] >> 4) << 8), 768);
    }
}

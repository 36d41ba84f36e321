//! What the fuzz targets share: one simulated GPU for the whole run (its
//! compute-unit threads are started once, not per input) and the session
//! layout the targets open.

use std::sync::{Arc, OnceLock};

use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::ResourceId;
use guest_proto::command::{Profile, SessionInit};
use guest_runtime::client::SessionLayout;

/// The simulated GPU every input runs on (two compute units).
pub fn sim_device() -> Arc<SimGpu> {
    static DEVICE: OnceLock<Arc<SimGpu>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            SimGpu::new(SimConfig {
                compute_units: 2,
                ..SimConfig::default()
            })
        })
        .clone()
}

/// The session buffer's layout.
pub const LAYOUT: SessionLayout = SessionLayout::COMPACT;

/// `SESSION_INIT` (compat) for a session buffer that is resource `res`.
pub fn session_init(res: ResourceId) -> SessionInit {
    LAYOUT
        .session_init(res, Profile::Compat)
        .unwrap_or_else(|e| panic!("the compact layout is valid: {e}"))
}

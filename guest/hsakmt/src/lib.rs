//! `libhsakmt.so.1` for guests of vhost-gpu-nc: the ROCm thunk that
//! Debian's unmodified ROCr 5.2.3 (`libhsa-runtime64.so.1`) links against,
//! implemented over the native context instead of `/dev/kfd`.
//!
//! It exports exactly the 42 `hsaKmt*` functions ROCr imports, versioned
//! `HSAKMT_1` (see `hsakmt.ver` and `build-lib.sh`), with the struct
//! layouts of Debian's `libhsakmt-dev` headers (`types`, checked against
//! the headers by `tests/layout.rs`). docs/rocm.md maps every function to
//! the protocol.
//!
//! Every export catches panics (none should happen) and turns them into
//! `HSAKMT_STATUS_ERROR`; every pointer from the caller is checked for
//! NULL, every handle against the thunk's own tables.

pub mod events;
pub mod protocol_ext;
pub mod queues;
pub mod svm;
pub mod thunk;
pub mod topology;
pub mod types;

mod exports;

/// Logs to stderr when `HSAKMT_DEBUG` is set.
pub fn debug(msg: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("HSAKMT_DEBUG").is_some()) {
        eprintln!("hsakmt: {}", msg());
    }
}

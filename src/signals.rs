//! SIGINT/SIGTERM: remove the sockets the daemon made and exit 0.
//!
//! The signals are blocked in every thread and taken by one thread with
//! `sigwait`, so nothing runs in signal-handler context.

use std::io;
use std::path::PathBuf;

/// Blocks SIGINT and SIGTERM in the calling thread (and every thread it
/// starts later) and starts the thread that takes them.
pub fn exit_on_termination(sockets: Vec<PathBuf>) -> io::Result<()> {
    // SAFETY: `set` is a plain value initialised by sigemptyset before
    // use; the calls only read and write it and the thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid
            // out-pointer for the duration of the call.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                log::info!("signal {sig}: exiting");
                for socket in &sockets {
                    let _ = std::fs::remove_file(socket);
                }
                std::process::exit(0);
            }
        })?;
    Ok(())
}

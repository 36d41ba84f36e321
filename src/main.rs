//! The `vhost-gpu-nc` command: parses the command line (the library's
//! `cli` module) and starts the backend (`start_backend`).

use std::process::ExitCode;

use clap::Parser;
use vhost_gpu_nc::cli::{CAPABILITIES_JSON, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        print!("{CAPABILITIES_JSON}");
        return ExitCode::SUCCESS;
    }
    // SAFETY: the process has started no threads yet (the logger, the
    // device and the signal thread all come later).
    let activated = unsafe { vhost_gpu_nc::socket::from_systemd_env() };
    if let Err(e) = vhost_gpu_nc::logging::init(cli.log_target, &cli.log_level) {
        eprintln!("vhost-gpu-nc: {e}");
        return ExitCode::FAILURE;
    }
    let activated = match activated {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match cli.into_config(activated) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-gpu-nc: {e}\n\nFor more information, try '--help'.");
            return ExitCode::from(2);
        }
    };
    match vhost_gpu_nc::start_backend(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

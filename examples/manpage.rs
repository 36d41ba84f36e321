//! Writes the vhost-gpu-nc(1) man page (roff) to stdout from the same clap
//! definition as `--help`: `cargo run --example manpage > vhost-gpu-nc.1`.
//! The package build (packaging/build-deb.sh) runs it.

use std::io::Write;

fn main() -> std::io::Result<()> {
    let man = clap_mangen::Man::new(vhost_gpu_nc::cli::command());
    let mut out = std::io::stdout().lock();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    // The --help epilogue: "HEADING:" lines open sections, the rest is kept
    // as laid out.
    let mut open = false;
    for line in vhost_gpu_nc::cli::AFTER_HELP.lines() {
        if let Some(head) = line.strip_suffix(':').filter(|h| !h.starts_with(' ')) {
            if open {
                writeln!(out, ".fi")?;
            }
            writeln!(out, ".SH \"{head}\"\n.nf")?;
            open = true;
        } else {
            writeln!(out, "{}", roff_line(line))?;
        }
    }
    if open {
        writeln!(out, ".fi")?;
    }
    man.render_version_section(&mut out)?;
    Ok(())
}

/// A text line safe for roff: backslashes escaped, no leading control
/// character.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

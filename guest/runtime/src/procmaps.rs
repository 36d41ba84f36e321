//! The process's own address space as `/proc/self/maps` describes it: what
//! a resolver that owns "the whole process" (XNACK-on unified memory, like
//! KFD's `svm_range_restore_pages`) checks a fault against.

use std::io;

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First byte.
    pub start: u64,
    /// First byte past the end.
    pub end: u64,
    /// `r` set.
    pub read: bool,
    /// `w` set.
    pub write: bool,
    /// `x` set.
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    /// The path or pseudo-name (`[heap]`, `[stack]`), empty for anonymous.
    pub path: String,
}

impl MapEntry {
    /// Whether the GPU may be given this mapping's pages on a fault: it is
    /// readable, it is not a device buffer's mapping (those are bound
    /// explicitly, never by faults), and not a kernel pseudo-mapping
    /// (`[vvar]`, `[vdso]`, `[vsyscall]`).
    pub fn fault_resolvable(&self) -> bool {
        self.read
            && !self.path.starts_with("/dev/")
            && !matches!(
                self.path.as_str(),
                "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]"
            )
    }
}

/// Parses one maps line; `None` if it is not one.
pub fn parse_line(line: &str) -> Option<MapEntry> {
    let mut fields = line.split_ascii_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if perms.len() != 4 || end <= start {
        return None;
    }
    // offset, dev, inode, then the path (which may contain spaces).
    let _ = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.collect::<Vec<_>>().join(" ");
    Some(MapEntry {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        path,
    })
}

/// Parses a whole maps file, skipping lines that do not parse.
pub fn parse(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mapping of this process that contains `addr`, read now.
pub fn lookup(addr: u64) -> io::Result<Option<MapEntry>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(parse(&text)
        .into_iter()
        .find(|m| m.start <= addr && addr < m.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_and_without_paths() {
        let m = parse(
            "55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]\n\
             7f0000000000-7f0000100000 rw-s 10000000 00:05 123  /dev/dri/renderD128\n\
             7f1000000000-7f1000001000 r-xp 00000000 08:01 77 /usr/lib/a b.so\n\
             7f2000000000-7f2000004000 ---p 00000000 00:00 0\n\
             garbage\n\
             ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n",
        );
        assert_eq!(m.len(), 5);
        assert_eq!((m[0].start, m[0].end), (0x55d0_c000_0000, 0x55d0_c002_1000));
        assert!(m[0].read && m[0].write && !m[0].exec && !m[0].shared);
        assert_eq!(m[0].path, "[heap]");
        assert!(m[0].fault_resolvable());
        assert!(
            m[1].shared && !m[1].fault_resolvable(),
            "device buffers are bound explicitly"
        );
        assert_eq!(m[2].path, "/usr/lib/a b.so");
        assert!(m[2].fault_resolvable() && !m[2].write);
        assert!(!m[3].fault_resolvable(), "PROT_NONE reservation");
        assert!(!m[4].fault_resolvable());
    }

    #[test]
    fn our_own_heap_is_found_and_a_hole_is_not() {
        let v = vec![7u8; 1 << 20];
        let found = lookup(v.as_ptr() as u64).unwrap().expect("heap mapped");
        assert!(found.read && found.write && found.fault_resolvable());
        assert_eq!(lookup(0x1000).unwrap(), None, "nothing at the NULL page");
    }
}

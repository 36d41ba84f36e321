//! Per-guest quotas shared by all contexts of one guest.
//!
//! A guest owns many contexts (one per process that opens the render node),
//! but the host resources they pin are the guest's as a whole: bound bytes
//! are charged to one counter that every context of the guest shares, so a
//! guest cannot multiply its allowance by opening more contexts.

use std::sync::atomic::{AtomicU64, Ordering};

/// The bound-bytes allowance of one guest.
#[derive(Debug)]
pub struct BoundBytesQuota {
    limit: u64,
    used: AtomicU64,
}

impl BoundBytesQuota {
    /// An allowance of `limit` bytes, none used.
    pub fn new(limit: u64) -> BoundBytesQuota {
        BoundBytesQuota {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `bytes` if they fit under the limit; false (and nothing
    /// charged) if they do not.
    pub fn try_charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Returns `bytes` to the allowance (saturating: never below zero).
    pub fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_and_releases() {
        let q = BoundBytesQuota::new(8192);
        assert!(q.try_charge(4096));
        assert!(q.try_charge(4096));
        assert!(!q.try_charge(1));
        assert_eq!(q.used(), 8192);
        q.release(4096);
        assert_eq!(q.used(), 4096);
        assert!(q.try_charge(4096));
        q.release(u64::MAX);
        assert_eq!(q.used(), 0);
        assert!(!q.try_charge(u64::MAX));
    }
}

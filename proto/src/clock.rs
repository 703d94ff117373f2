//! [`Clock`]: the wall clock twopc reads for deadlines, txn-id ages and
//! retention, as a value a node is given rather than a global.
//!
//! A real node uses the system clock. A test gives each simulated node its
//! own [`Clock`] and moves it with [`Clock::jump_ms`], which models that
//! node's clock being stepped (an NTP correction, a VM resumed) while the
//! others keep time: the protocol must stay safe whatever one clock says,
//! since deadlines and retention are its only uses of wall time (the
//! coordinators' log entries carry the proposer's time, so every replica
//! applies a retention decision alike).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::TxnId;
use crate::txn_id::unix_now_ms;

/// The system clock plus an offset that only [`Clock::jump_ms`] moves. Cheap
/// to clone; clones share the offset. The default is the system clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

/// Two clocks are equal when they are the same clock (clones of one another).
impl PartialEq for Clock {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.offset_ms, &other.offset_ms)
    }
}

impl Eq for Clock {}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now, in Unix milliseconds, by this clock.
    pub fn unix_now_ms(&self) -> u64 {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        unix_now_ms().saturating_add_signed(offset)
    }

    /// Milliseconds since `txn` was created, by this clock (0 if in the future).
    pub fn age_ms(&self, txn: TxnId) -> u64 {
        self.unix_now_ms().saturating_sub(txn.created_unix_ms())
    }

    /// Steps this clock (and its clones) by `by_ms`, forward or back.
    pub fn jump_ms(&self, by_ms: i64) {
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
    }

    /// How far this clock is from the system clock, in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Clock jumps (docs/TESTING.md): a jump moves this clock and its clones, not the system's.
    #[test]
    fn a_jump_moves_this_clock_and_its_clones_only() {
        let clock = Clock::system();
        let clone = clock.clone();
        let other = Clock::system();
        clock.jump_ms(60_000);
        let ahead = clone.unix_now_ms().saturating_sub(other.unix_now_ms());
        assert!((59_000..=60_000).contains(&ahead), "{ahead}");
        clock.jump_ms(-120_000);
        assert_eq!(clone.offset_ms(), -60_000);
        assert!(clock.unix_now_ms() < unix_now_ms());
        let txn = TxnId::new();
        assert_eq!(clock.age_ms(txn), 0, "an id from the future is 0 ms old");
        assert!(other.age_ms(txn) < 1_000);
    }
}

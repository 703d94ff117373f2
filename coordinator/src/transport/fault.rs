//! Test fault injection: isolate nodes, partition the cluster, and drop,
//! delay, reorder or duplicate messages per directed link.
//!
//! One [`FaultFilter`] is shared by every node of an in-process cluster; the
//! sending side asks it for a [`Verdict`] once per message (see the
//! `transport` module doc). With no faults set, a verdict costs one atomic load.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use rand::Rng as _;
use twopc_proto::host;

/// Faults on one directed link (`from -> to`). The default is no fault.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkFault {
    /// Drop every message on the link.
    pub drop_all: bool,
    /// Chance in `[0, 1]` that a message is dropped.
    pub drop_probability: f64,
    /// Every message on the link is delivered this many milliseconds late.
    pub delay_ms: u64,
    /// Each message is delivered up to this many milliseconds later still, a
    /// random amount per message, so later messages overtake earlier ones
    /// (reordering).
    pub jitter_ms: u64,
    /// Chance in `[0, 1]` that a message is delivered twice (never a snapshot).
    pub duplicate_probability: f64,
}

impl LinkFault {
    /// A link that delivers every message `delay_ms` late.
    pub fn delayed(delay_ms: u64) -> Self {
        Self { delay_ms, ..Self::default() }
    }

    /// A link that delivers nothing.
    pub fn cut() -> Self {
        Self { drop_all: true, ..Self::default() }
    }

    fn roll(&self) -> Verdict {
        if self.drop_all || chance(self.drop_probability) {
            return Verdict::Drop;
        }
        let jitter = if self.jitter_ms == 0 { 0 } else { host::with_rng(|rng| rng.random_range(0..=self.jitter_ms)) };
        let delay = Duration::from_millis(self.delay_ms.saturating_add(jitter));
        if chance(self.duplicate_probability) {
            return Verdict::Duplicate(delay);
        }
        if delay.is_zero() { Verdict::Deliver } else { Verdict::Delay(delay) }
    }
}

fn chance(probability: f64) -> bool {
    // The host's generator: a deterministic simulation seeds it.
    probability > 0.0 && (probability >= 1.0 || host::with_rng(|rng| rng.random::<f64>()) < probability)
}

/// The fate of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it now.
    Deliver,
    /// Drop it.
    Drop,
    /// Send it after this long.
    Delay(Duration),
    /// Send it twice, both copies after this long (zero: now).
    Duplicate(Duration),
}

#[derive(Debug, Default)]
struct Rules {
    /// Crashed nodes: cut off like isolated ones, but [`FaultFilter::heal`]
    /// leaves them down (a heal mends the network, not a dead process).
    down: HashSet<u64>,
    isolated: HashSet<u64>,
    partitions: Vec<(HashSet<u64>, HashSet<u64>)>,
    links: HashMap<(u64, u64), LinkFault>,
}

impl Rules {
    fn is_empty(&self) -> bool {
        self.down.is_empty() && self.isolated.is_empty() && self.partitions.is_empty() && self.links.is_empty()
    }

    /// Whether an isolation or a partition separates `from` and `to`.
    fn separates(&self, from: u64, to: u64) -> bool {
        self.down.contains(&from)
            || self.down.contains(&to)
            || self.isolated.contains(&from)
            || self.isolated.contains(&to)
            || self
                .partitions
                .iter()
                .any(|(a, b)| (a.contains(&from) && b.contains(&to)) || (b.contains(&from) && a.contains(&to)))
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether any rule is set: lets `verdict` skip the lock in the common case.
    active: AtomicBool,
    rules: RwLock<Rules>,
}

/// Fault injection shared by the nodes of an in-process cluster. Cheap to
/// clone (all clones share the same rules); the default has no faults.
///
/// Rules add up: a message is dropped if any isolation or partition
/// separates its endpoints, otherwise its link's [`LinkFault`] applies.
#[derive(Clone, Default)]
pub struct FaultFilter {
    inner: Arc<Inner>,
}

impl fmt::Debug for FaultFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FaultFilter").field(&*self.inner.rules.read()).finish()
    }
}

impl FaultFilter {
    /// Drops every message to or from `node`.
    pub fn isolate(&self, node: u64) {
        self.update(|rules| {
            rules.isolated.insert(node);
        });
    }

    /// Drops every message between a node of `side_a` and a node of `side_b`,
    /// in both directions. Traffic within a side is untouched.
    pub fn partition(&self, side_a: &[u64], side_b: &[u64]) {
        let side_a = side_a.iter().copied().collect();
        let side_b = side_b.iter().copied().collect();
        self.update(|rules| rules.partitions.push((side_a, side_b)));
    }

    /// Sets the faults of the directed link `from -> to`, replacing earlier ones.
    /// `LinkFault::default()` clears the link.
    pub fn set_link(&self, from: u64, to: u64, fault: LinkFault) {
        self.update(|rules| {
            if fault == LinkFault::default() {
                rules.links.remove(&(from, to));
            } else {
                rules.links.insert((from, to), fault);
            }
        });
    }

    /// Marks `node` crashed (`true`: nothing it sends from now on is
    /// delivered, nor anything sent to it) or restarted (`false`). A crash
    /// test sets it before the node's disk loses its unsynced writes, so the
    /// dying node cannot act on writes that are gone.
    pub fn set_down(&self, node: u64, down: bool) {
        self.update(|rules| {
            if down {
                rules.down.insert(node);
            } else {
                rules.down.remove(&node);
            }
        });
    }

    /// Removes every network fault: isolations, partitions and link faults.
    /// Crashed nodes ([`FaultFilter::set_down`]) stay down.
    pub fn heal(&self) {
        self.update(|rules| *rules = Rules { down: std::mem::take(&mut rules.down), ..Rules::default() });
    }

    /// The fate of one message sent now on `from -> to`. Probabilistic faults
    /// roll the dice on every call.
    pub fn verdict(&self, from: u64, to: u64) -> Verdict {
        if !self.inner.active.load(Ordering::Acquire) {
            return Verdict::Deliver;
        }
        let link = {
            let rules = self.inner.rules.read();
            if rules.separates(from, to) {
                return Verdict::Drop;
            }
            rules.links.get(&(from, to)).copied()
        };
        link.map_or(Verdict::Deliver, |link| link.roll())
    }

    fn update(&self, change: impl FnOnce(&mut Rules)) {
        let mut rules = self.inner.rules.write();
        change(&mut rules);
        self.inner.active.store(!rules.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_delivers_everything() {
        let faults = FaultFilter::default();
        assert_eq!(faults.verdict(1, 2), Verdict::Deliver);
    }

    #[test]
    fn isolate_cuts_both_directions_of_that_node_only() {
        let faults = FaultFilter::default();
        faults.isolate(2);
        assert_eq!(faults.verdict(1, 2), Verdict::Drop);
        assert_eq!(faults.verdict(2, 3), Verdict::Drop);
        assert_eq!(faults.verdict(1, 3), Verdict::Deliver);
        faults.heal();
        assert_eq!(faults.verdict(1, 2), Verdict::Deliver);
    }

    #[test]
    fn a_crashed_node_stays_cut_off_through_a_heal_until_it_restarts() {
        let faults = FaultFilter::default();
        faults.set_down(2, true);
        faults.heal();
        assert_eq!(faults.verdict(2, 1), Verdict::Drop);
        assert_eq!(faults.verdict(3, 2), Verdict::Drop);
        faults.set_down(2, false);
        assert_eq!(faults.verdict(2, 1), Verdict::Deliver);
    }

    #[test]
    fn partition_cuts_across_sides_not_within() {
        let faults = FaultFilter::default();
        faults.partition(&[1, 2], &[3, 4, 5]);
        assert_eq!(faults.verdict(1, 3), Verdict::Drop);
        assert_eq!(faults.verdict(5, 2), Verdict::Drop);
        assert_eq!(faults.verdict(1, 2), Verdict::Deliver);
        assert_eq!(faults.verdict(3, 4), Verdict::Deliver);
        faults.heal();
        assert_eq!(faults.verdict(1, 3), Verdict::Deliver);
    }

    #[test]
    fn link_faults_are_directed_and_clearable() {
        let faults = FaultFilter::default();
        faults.set_link(1, 2, LinkFault::delayed(30));
        assert_eq!(faults.verdict(1, 2), Verdict::Delay(Duration::from_millis(30)));
        assert_eq!(faults.verdict(2, 1), Verdict::Deliver);

        faults.set_link(1, 2, LinkFault { duplicate_probability: 1.0, ..LinkFault::default() });
        assert_eq!(faults.verdict(1, 2), Verdict::Duplicate(Duration::ZERO));

        faults.set_link(1, 2, LinkFault::cut());
        assert_eq!(faults.verdict(1, 2), Verdict::Drop);

        faults.set_link(1, 2, LinkFault::default());
        assert_eq!(faults.verdict(1, 2), Verdict::Deliver);
    }

    #[test]
    fn drop_probability_drops_about_that_share() {
        let faults = FaultFilter::default();
        faults.set_link(1, 2, LinkFault { drop_probability: 0.5, ..LinkFault::default() });
        let dropped = (0..10_000).filter(|_| faults.verdict(1, 2) == Verdict::Drop).count();
        // 10k fair coin flips land within 4,000..6,000 except with negligible probability.
        assert!((4_000..6_000).contains(&dropped), "dropped {dropped} of 10000");
    }
}

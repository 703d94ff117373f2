//! Seeded election timeouts, so a simulation can replay a node's elections.
//!
//! raft-rs 0.7 draws each randomised election timeout from
//! `rand::thread_rng()` whenever its term or role changes (`Raft::reset`), and
//! `raft::Config` takes no seed. [`SeededElectionTimeout`] watches for those
//! resets from outside, after each step of the raft task, and replaces raft's
//! draw with one from a seeded generator, in the same range
//! (`[election_tick, 2 * election_tick)`). The replacement happens before the
//! next tick, so raft's own draw is never used: given the same seed and the
//! same sequence of events, a node times out at the same ticks.

use raft::{Raft, StateRole, Storage};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Replaces raft-rs's thread-random election timeouts with seeded ones.
pub(crate) struct SeededElectionTimeout {
    rng: StdRng,
    /// The (term, role) whose timeout was last drawn here; raft resets the
    /// timeout exactly when one of them changes.
    drawn_for: Option<(u64, StateRole)>,
}

impl SeededElectionTimeout {
    pub(crate) fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), drawn_for: None }
    }

    /// Call after anything that may have reset raft's timeout (a tick, a
    /// step, a campaign) and before the next tick.
    pub(crate) fn after_step<S: Storage>(&mut self, raft: &mut Raft<S>) {
        let now = (raft.term, raft.state);
        if self.drawn_for == Some(now) {
            return;
        }
        self.drawn_for = Some(now);
        let min = raft.election_timeout();
        raft.set_randomized_election_timeout(self.rng.random_range(min..2 * min));
    }
}

#[cfg(test)]
mod tests {
    use raft::storage::MemStorage;
    use raft::{Config, RawNode};

    use super::*;

    fn node() -> RawNode<MemStorage> {
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let config = Config { id: 1, election_tick: 10, heartbeat_tick: 2, ..Config::default() };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        RawNode::new(&config, storage, &logger).expect("a valid raft config")
    }

    /// The election timeouts a node goes through over `rounds` campaigns.
    fn timeouts(seed: u64, rounds: usize) -> Vec<usize> {
        let mut raw = node();
        let mut seeded = SeededElectionTimeout::new(seed);
        seeded.after_step(&mut raw.raft);
        let mut seen = vec![raw.raft.randomized_election_timeout()];
        for _ in 0..rounds {
            raw.campaign().expect("campaign");
            seeded.after_step(&mut raw.raft);
            seen.push(raw.raft.randomized_election_timeout());
        }
        seen
    }

    // Replay (docs/TESTING.md): with a seed, each term's election timeout is the seeded draw, not
    // raft-rs's thread_rng, so the same seed gives the same timeouts and another seed other ones.
    #[test]
    fn the_same_seed_gives_the_same_election_timeouts() {
        let first = timeouts(7, 20);
        assert_eq!(first, timeouts(7, 20));
        assert_ne!(first, timeouts(8, 20), "two seeds drew the same 21 timeouts");
        assert!(first.iter().all(|t| (10..20).contains(t)), "{first:?}");
    }
}

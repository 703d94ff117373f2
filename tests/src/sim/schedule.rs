//! Fault schedules: a seeded RNG picks, up front, which faults strike and
//! when, from the menu of a [`FaultMix`]; [`apply`] carries one out on a
//! [`World`]. The schedule is a pure function of the seed, so a failing seed
//! replays the same faults at the same offsets (the interleaving of threads,
//! sockets and timers around them still varies).

use std::fmt;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use twopc_coordinator::config::EngineConfig;
use twopc_coordinator::transport::LinkFault;

use twopc_coordinator::node::Membership;

use crate::gate::CallChaos;
use crate::sim::world::World;

/// Which coordinator a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Whichever node leads when the fault strikes (a random running one if none does).
    Leader,
    /// This node.
    Node(u64),
}

/// One fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Crash a coordinator: its raft task and server stop; its disk survives.
    CrashCoordinator(Pick),
    /// Restart every crashed coordinator from its disk.
    RestartCoordinators,
    /// Cut one coordinator off from every other.
    Isolate(Pick),
    /// Split the coordinators into these and the rest.
    Partition(Vec<u64>),
    /// Each coordinator hears only its two ring neighbours (5 nodes), or a
    /// bridge (3 nodes: the two ends hear only the middle one).
    Ring,
    /// Drop, delay and duplicate raft messages on these directed links.
    LinkChaos(Vec<(u64, u64, LinkFault)>),
    /// Heal every raft link.
    HealNetwork,
    /// Crash a bank (by index); its store survives.
    CrashBank(usize),
    /// Restart every crashed bank.
    RestartBanks,
    /// Decide calls fail (true) or go through again (false): phase 2 stalls.
    DecideOutage(bool),
    /// Seeded loss and delay of coordinator-participant calls; None stops it.
    CallChaos(Option<CallChaos>),
    /// The leader hands leadership to another node, mid-traffic.
    TransferLeader,
    /// One node's wall clock is stepped by `by_ms` (forward or back) and
    /// stays so: its deadline checks and txn-id ages are off from then on.
    ClockJump {
        /// Whose clock.
        clock: ClockOf,
        /// How far, in milliseconds.
        by_ms: i64,
    },
    /// An operator asks the leader for a
    /// membership change that cannot succeed and must be refused before it
    /// is logged (docs/PROTOCOL.md §4.6); then the node asked crashes and
    /// restarts, replaying whatever it logged.
    RefusedMembership(Refused),
}

/// A membership change the cluster must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Remove a node id that is no member.
    RemoveNonMember(u64),
    /// Remove the leader itself (it must hand leadership on first).
    RemoveLeader,
}

/// Whose clock a [`Fault::ClockJump`] steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockOf {
    /// A coordinator's.
    Coordinator(Pick),
    /// A bank's (by index).
    Bank(usize),
}

/// A fault and when it strikes, in milliseconds from the start of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Offset from the start of the workload.
    pub at_ms: u64,
    /// What strikes.
    pub fault: Fault,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {:>5} ms: {:?}", self.at_ms, self.fault)
    }
}

/// A family of faults; each seed draws its schedule from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultMix {
    /// No faults: the baseline.
    Calm,
    /// Coordinator and bank crashes and restarts, the leader included.
    Crashes,
    /// Network partitions of every shape: one node, minority/majority, ring or bridge.
    Partitions,
    /// Lossy, slow and duplicating raft links.
    Links,
    /// Bank crashes, phase-2 outages, lossy and slow participant calls.
    Participants,
    /// Leadership transfers during phase 2, and leader crashes.
    LeaderMoves,
    /// All of the above at once, majority loss included.
    Everything,
}

impl FaultMix {
    /// Every mix, in the order seeds cycle through them.
    pub const ALL: [Self; 7] = [
        Self::Calm,
        Self::Crashes,
        Self::Partitions,
        Self::Links,
        Self::Participants,
        Self::LeaderMoves,
        Self::Everything,
    ];

    /// The mix seed `seed` uses.
    pub fn for_seed(seed: u64) -> Self {
        Self::ALL[usize::try_from(seed % Self::ALL.len() as u64).unwrap_or(0)]
    }
}

/// The kinds of fault a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Crash,
    Isolate,
    Partition,
    Ring,
    Links,
    Heal,
    CrashBank,
    Outage,
    Chaos,
    Transfer,
    Clock,
}

fn menu(mix: FaultMix) -> &'static [Kind] {
    use Kind::*;
    match mix {
        FaultMix::Calm => &[],
        FaultMix::Crashes => &[Crash, Crash, CrashBank],
        FaultMix::Partitions => &[Isolate, Partition, Ring, Heal],
        FaultMix::Links => &[Links, Links, Heal],
        FaultMix::Participants => &[CrashBank, Outage, Chaos, Chaos, Clock],
        FaultMix::LeaderMoves => &[Transfer, Transfer, Crash, Clock],
        FaultMix::Everything => {
            &[Crash, Isolate, Partition, Ring, Links, Heal, CrashBank, Outage, Chaos, Transfer, Clock]
        }
    }
}

/// Draws the faults of one run: 3 to 8 of them (none for [`FaultMix::Calm`])
/// within `window_ms`, each a kind from the mix with its parameters. Crashed
/// coordinators are restarted before more than a minority is down, except in
/// [`FaultMix::Everything`], which may take a majority down for a while.
pub fn schedule(seed: u64, mix: FaultMix, coordinators: u64, banks: usize, window_ms: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let kinds = menu(mix);
    if kinds.is_empty() {
        return Vec::new();
    }
    let count = rng.random_range(3..=8);
    let mut times: Vec<u64> = (0..count).map(|_| rng.random_range(50..window_ms.max(51))).collect();
    times.sort_unstable();
    let down_max = if mix == FaultMix::Everything { coordinators.div_ceil(2) } else { (coordinators - 1) / 2 };
    let mut down = 0;
    let mut banks_down = false;
    let mut steps = Vec::new();
    for at_ms in times {
        let kind = *kinds.choose(&mut rng).unwrap_or(&Kind::Heal);
        let fault = match kind {
            Kind::Crash if down >= down_max => {
                down = 0;
                Fault::RestartCoordinators
            }
            Kind::Crash => {
                down += 1;
                if rng.random_bool(0.5) {
                    Fault::CrashCoordinator(Pick::Leader)
                } else {
                    Fault::CrashCoordinator(Pick::Node(rng.random_range(1..=coordinators)))
                }
            }
            Kind::Isolate if rng.random_bool(0.5) => Fault::Isolate(Pick::Leader),
            Kind::Isolate => Fault::Isolate(Pick::Node(rng.random_range(1..=coordinators))),
            Kind::Partition => {
                let mut nodes: Vec<u64> = (1..=coordinators).collect();
                for i in (1..nodes.len()).rev() {
                    nodes.swap(i, rng.random_range(0..=i));
                }
                let side = rng.random_range(1..=coordinators / 2);
                Fault::Partition(nodes[..usize::try_from(side).unwrap_or(1)].to_vec())
            }
            Kind::Ring => Fault::Ring,
            Kind::Links => {
                let links = (0..rng.random_range(1..=3))
                    .map(|_| {
                        let from = rng.random_range(1..=coordinators);
                        let to = (from + rng.random_range(1..coordinators) - 1) % coordinators + 1;
                        let fault = LinkFault {
                            drop_all: false,
                            drop_probability: rng.random_range(0.0..0.3),
                            delay_ms: rng.random_range(0..40),
                            jitter_ms: rng.random_range(0..40),
                            duplicate_probability: rng.random_range(0.0..0.3),
                        };
                        (from, to, fault)
                    })
                    .collect();
                Fault::LinkChaos(links)
            }
            Kind::Heal => Fault::HealNetwork,
            Kind::CrashBank if banks_down => {
                banks_down = false;
                Fault::RestartBanks
            }
            Kind::CrashBank => {
                banks_down = true;
                Fault::CrashBank(rng.random_range(0..banks))
            }
            Kind::Outage => Fault::DecideOutage(rng.random_bool(0.6)),
            Kind::Chaos if rng.random_bool(0.2) => Fault::CallChaos(None),
            Kind::Chaos => Fault::CallChaos(Some(CallChaos {
                seed: rng.random(),
                loss_probability: rng.random_range(0.05..0.3),
                delay_max_ms: rng.random_range(0..80),
            })),
            Kind::Transfer => Fault::TransferLeader,
            Kind::Clock => {
                let clock = if rng.random_bool(0.5) {
                    ClockOf::Bank(rng.random_range(0..banks))
                } else if rng.random_bool(0.5) {
                    ClockOf::Coordinator(Pick::Leader)
                } else {
                    ClockOf::Coordinator(Pick::Node(rng.random_range(1..=coordinators)))
                };
                // Mostly up to 20 s either way: past a txn's deadline (3 s in
                // the simulation) in both directions, inside the retention
                // window. One jump in five goes past the coordinators'
                // retention window: a leader running ahead forgets finished
                // txns early and refuses new ones as too old, and must still
                // never run a txn twice or leave a branch in doubt.
                let retention_ms = i64::try_from(EngineConfig::default().retention_ms).unwrap_or(i64::MAX / 2);
                let span_ms = if rng.random_bool(0.2) {
                    rng.random_range(retention_ms + 1_000..=retention_ms + 30_000)
                } else {
                    rng.random_range(200..=20_000)
                };
                let by_ms = span_ms * if rng.random_bool(0.5) { 1 } else { -1 };
                Fault::ClockJump { clock, by_ms }
            }
        };
        steps.push(Step { at_ms, fault });
    }
    steps
}

/// The membership churn of a run with adversaries: one or two refused
/// changes, each followed by a restart of the node asked, at random offsets
/// within `window_ms`. Drawn from its own generator, so the faults of
/// [`schedule`] stay those of the seed without adversaries.
pub fn churn(seed: u64, coordinators: u64, window_ms: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4u64.rotate_left(56));
    (0..rng.random_range(1..=2))
        .map(|_| {
            let at_ms = rng.random_range(50..window_ms.max(51));
            let refused = if rng.random_bool(0.5) {
                Refused::RemoveLeader
            } else {
                Refused::RemoveNonMember(coordinators + rng.random_range(1..=5))
            };
            Step { at_ms, fault: Fault::RefusedMembership(refused) }
        })
        .collect()
}

/// `faults` and `churn` in one schedule, by time (a fault before churn at the same offset).
pub fn merge(faults: Vec<Step>, churn: Vec<Step>) -> Vec<Step> {
    let mut all: Vec<Step> = faults.into_iter().chain(churn).collect();
    all.sort_by_key(|s| s.at_ms);
    all
}

/// Carries out `fault` on `world` and says what it did (the leader it
/// struck, say). `rng` picks a node where the schedule left it open.
///
/// # Errors
/// A restart failed (the harness broke, not the system under test).
pub async fn apply(world: &mut World, fault: &Fault, rng: &mut StdRng) -> anyhow::Result<String> {
    let coordinators = world.config().coordinators;
    let resolve = |world: &World, pick: Pick, rng: &mut StdRng| match pick {
        Pick::Node(id) => id,
        Pick::Leader => world.leader().unwrap_or_else(|| {
            let running = world.cluster.running();
            running.choose(rng).copied().unwrap_or(1)
        }),
    };
    let done = match fault {
        Fault::CrashCoordinator(pick) => {
            let id = resolve(world, *pick, rng);
            let lost = world.kill(id).await?;
            format!("crashed node {id} (its log lost {} unsynced changes in {} files)", lost.changes, lost.files)
        }
        Fault::RestartCoordinators => {
            let down: Vec<u64> = world.down().iter().copied().collect();
            for id in &down {
                world.restart(*id).await?;
            }
            format!("restarted nodes {down:?}")
        }
        Fault::Isolate(pick) => {
            let id = resolve(world, *pick, rng);
            world.cluster.faults.isolate(id);
            format!("isolated node {id}")
        }
        Fault::Partition(side) => {
            let rest: Vec<u64> = (1..=coordinators).filter(|id| !side.contains(id)).collect();
            world.cluster.faults.partition(side, &rest);
            format!("partitioned {side:?} from {rest:?}")
        }
        Fault::Ring => {
            let neighbours = |a: u64, b: u64| {
                if coordinators <= 3 {
                    a == 2 || b == 2
                } else {
                    let d = a.abs_diff(b);
                    d == 1 || d == coordinators - 1
                }
            };
            for a in 1..=coordinators {
                for b in (1..=coordinators).filter(|b| *b != a && !neighbours(a, *b)) {
                    world.cluster.faults.set_link(a, b, LinkFault::cut());
                }
            }
            "cut every link but the ring's (bridge through node 2 on 3 nodes)".to_owned()
        }
        Fault::LinkChaos(links) => {
            for (from, to, fault) in links {
                world.cluster.faults.set_link(*from, *to, *fault);
            }
            format!("link faults on {} links", links.len())
        }
        Fault::HealNetwork => {
            world.cluster.faults.heal();
            "healed the raft network".to_owned()
        }
        Fault::CrashBank(index) => {
            let count = world.banks.len();
            let bank = &mut world.banks[*index % count];
            let lost = bank.crash().await?;
            format!("crashed {} (its store lost {} unsynced changes)", bank.name, lost.changes)
        }
        Fault::RestartBanks => {
            for bank in &mut world.banks {
                bank.restart().await?;
            }
            "restarted every bank".to_owned()
        }
        Fault::DecideOutage(on) => {
            world.cluster.gate.fail_decides(*on);
            format!("decide outage {}", if *on { "on" } else { "off" })
        }
        Fault::CallChaos(chaos) => {
            world.cluster.gate.set_chaos(*chaos);
            format!("participant call chaos {chaos:?}")
        }
        Fault::ClockJump { clock, by_ms } => {
            let (whose, jumped) = match *clock {
                ClockOf::Coordinator(pick) => {
                    let id = resolve(world, pick, rng);
                    (format!("node {id}"), world.coordinator_clock(id))
                }
                ClockOf::Bank(index) => {
                    let bank = &world.banks[index % world.banks.len()];
                    (bank.name.clone(), Some(bank.clock()))
                }
            };
            let struck = match jumped {
                Some(c) => {
                    c.jump_ms(*by_ms);
                    format!("{whose}'s clock jumped {by_ms:+} ms (now {:+} ms off)", c.offset_ms())
                }
                None => format!("{whose} has no clock to jump"),
            };
            world.note_clock_ahead();
            struck
        }
        Fault::RefusedMembership(refused) => refuse_membership(world, *refused).await?,
        Fault::TransferLeader => match world.leader() {
            Some(leader) => {
                let others: Vec<u64> = world.cluster.running().into_iter().filter(|id| *id != leader).collect();
                match others.choose(rng) {
                    Some(&to) => {
                        let result = world.cluster.node(leader).transfer_leader(to).await;
                        format!("leader {leader} hands over to {to}: {result:?}")
                    }
                    None => "no node to hand leadership to".to_owned(),
                }
            }
            None => "no leader to move".to_owned(),
        },
    };
    Ok(done)
}

/// Asks the leader (`NodeHandle::change_membership`, what `Admin.RemoveNode`
/// calls) for a change it must refuse, notes it for the checker if
/// it was not refused, then crashes and restarts the node asked (a node that
/// logged a change raft rejects must still start, docs/PROTOCOL.md §4.6).
async fn refuse_membership(world: &mut World, refused: Refused) -> anyhow::Result<String> {
    let Some(leader) = world.leader() else {
        return Ok(format!("{refused:?}: no leader to ask"));
    };
    let id = match refused {
        Refused::RemoveNonMember(id) => id,
        Refused::RemoveLeader => leader,
    };
    // Straight to the leader's node, not through a leader-following client:
    // were leadership to move on the way, removing the old leader would be
    // a change the cluster may accept.
    let answer = match world.cluster.node(leader).change_membership(Membership::Remove { id }).await {
        Ok(()) => {
            let what = format!("removing node {id} ({refused:?}, leader {leader}) was accepted; it had to be refused");
            world.membership_accepted(what);
            "accepted".to_owned()
        }
        Err(err) => format!("refused: {err}"),
    };
    let lost = world.kill(leader).await?;
    world.restart(leader).await?;
    Ok(format!(
        "asked to remove node {id} ({refused:?}): {answer}; restarted node {leader} (its log lost {} unsynced changes)",
        lost.changes
    ))
}

//! A participant client for coordinators under test: the real gRPC client,
//! with switches that hold or fail calls at the protocol's dangerous points,
//! and seeded chaos on the coordinator-participant links (the raft links have
//! the coordinator's own fault filter).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::watch;
use twopc_coordinator::participant_client::{Acknowledgement, CallError, GrpcParticipants, ParticipantClient, Target};
use twopc_proto::{Decision, TxnId, Vote};

/// The switches, shared by every node of a test cluster.
#[derive(Clone)]
pub struct Gate {
    hold_after_prepare: watch::Sender<bool>,
    fail_decides: Arc<AtomicBool>,
    prepared: Arc<AtomicU64>,
    chaos: Arc<Mutex<Option<Chaos>>>,
}

/// Seeded faults on every coordinator-to-participant call: a call may be
/// delayed, lost before it reaches the participant, or have its answer lost
/// after the participant acted on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallChaos {
    /// Seeds the dice (the interleaving still varies from run to run).
    pub seed: u64,
    /// Chance in `[0, 1]` that a call is lost (half before, half after the participant).
    pub loss_probability: f64,
    /// Each call waits up to this long before it is made.
    pub delay_max_ms: u64,
}

struct Chaos {
    config: CallChaos,
    rng: StdRng,
}

/// What the chaos does to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Deliver,
    LoseRequest,
    LoseAnswer,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            hold_after_prepare: watch::Sender::new(false),
            fail_decides: Arc::default(),
            prepared: Arc::default(),
            chaos: Arc::default(),
        }
    }
}

impl Gate {
    /// Prepare answers are held (after the participant answered) until released:
    /// the coordinator sits between voting and logging its decision.
    pub fn hold_after_prepare(&self, hold: bool) {
        self.hold_after_prepare.send_replace(hold);
    }

    /// Decide calls fail without reaching the participant: the decision is
    /// logged but phase 2 does not happen.
    pub fn fail_decides(&self, fail: bool) {
        self.fail_decides.store(fail, Ordering::SeqCst);
    }

    /// Sets (Some) or clears (None) the seeded chaos on every call.
    pub fn set_chaos(&self, chaos: Option<CallChaos>) {
        *self.chaos.lock() = chaos.map(|config| Chaos { config, rng: StdRng::seed_from_u64(config.seed) });
    }

    /// Rolls the dice for one call: how long it waits, and its fate.
    fn roll(&self) -> (Duration, Fate) {
        let mut chaos = self.chaos.lock();
        let Some(chaos) = chaos.as_mut() else {
            return (Duration::ZERO, Fate::Deliver);
        };
        let delay = Duration::from_millis(chaos.rng.random_range(0..=chaos.config.delay_max_ms));
        let fate = if chaos.rng.random_bool(chaos.config.loss_probability.clamp(0.0, 1.0)) {
            if chaos.rng.random_bool(0.5) { Fate::LoseRequest } else { Fate::LoseAnswer }
        } else {
            Fate::Deliver
        };
        (delay, fate)
    }

    /// Prepare calls the participants have answered so far.
    pub fn prepares_answered(&self) -> u64 {
        self.prepared.load(Ordering::SeqCst)
    }

    /// A client for one node.
    pub fn client(&self, connect_timeout: Duration) -> GatedParticipants {
        self.client_with_tls(connect_timeout, None)
    }

    /// [`Gate::client`], calling participants over mutual TLS when `tls` is given.
    pub fn client_with_tls(&self, connect_timeout: Duration, tls: Option<twopc_proto::tls::Tls>) -> GatedParticipants {
        GatedParticipants { grpc: GrpcParticipants::new(connect_timeout).with_tls(tls), gate: self.clone() }
    }
}

/// The gRPC participant client behind a [`Gate`].
pub struct GatedParticipants {
    grpc: GrpcParticipants,
    gate: Gate,
}

impl ParticipantClient for GatedParticipants {
    async fn prepare(
        &self,
        target: &Target,
        txn_id: TxnId,
        payload: Bytes,
        deadline_unix_ms: u64,
        timeout: Duration,
    ) -> Result<Vote, CallError> {
        let (delay, fate) = self.gate.roll();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fate == Fate::LoseRequest {
            return Err(lost(target, "prepare request"));
        }
        let vote = self.grpc.prepare(target, txn_id, payload, deadline_unix_ms, timeout).await;
        self.gate.prepared.fetch_add(1, Ordering::SeqCst);
        if fate == Fate::LoseAnswer {
            return Err(lost(target, "prepare answer"));
        }
        let mut held = self.gate.hold_after_prepare.subscribe();
        // An error means the gate is gone with the test: stop holding.
        let _ = held.wait_for(|hold| !hold).await;
        vote
    }

    async fn recover_vote(
        &self,
        target: &Target,
        txn_id: TxnId,
        staged: Option<twopc_proto::PayloadDigest>,
        timeout: Duration,
    ) -> Result<Vote, CallError> {
        let (delay, fate) = self.gate.roll();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fate == Fate::LoseRequest {
            return Err(lost(target, "vote recovery request"));
        }
        let vote = self.grpc.recover_vote(target, txn_id, staged, timeout).await;
        if fate == Fate::LoseAnswer {
            return Err(lost(target, "vote recovery answer"));
        }
        vote
    }

    async fn decide_batch(
        &self,
        target: &Target,
        decisions: &[(TxnId, Decision)],
        timeout: Duration,
    ) -> Result<Vec<Acknowledgement>, CallError> {
        if self.gate.fail_decides.load(Ordering::SeqCst) {
            return Err(CallError::new(target, "decide held by the test gate"));
        }
        let (delay, fate) = self.gate.roll();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fate == Fate::LoseRequest {
            return Err(lost(target, "decide request"));
        }
        let acknowledged = self.grpc.decide_batch(target, decisions, timeout).await;
        if fate == Fate::LoseAnswer && acknowledged.is_ok() {
            return Err(lost(target, "decide acknowledgement"));
        }
        acknowledged
    }
}

fn lost(target: &Target, what: &str) -> CallError {
    CallError::new(target, format!("{what} lost by the test gate"))
}

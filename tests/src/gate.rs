//! A participant client for coordinators under test: the real gRPC client,
//! with switches that hold or fail calls at the protocol's dangerous points.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use twopc_coordinator::participant_client::{CallError, GrpcParticipants, ParticipantClient, Target};
use twopc_proto::{Decision, TxnId, Vote};

/// The switches, shared by every node of a test cluster.
#[derive(Clone)]
pub struct Gate {
    hold_after_prepare: watch::Sender<bool>,
    fail_decides: Arc<AtomicBool>,
    prepared: Arc<AtomicU64>,
}

impl Default for Gate {
    fn default() -> Self {
        Self { hold_after_prepare: watch::Sender::new(false), fail_decides: Arc::default(), prepared: Arc::default() }
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

    /// Prepare calls the participants have answered so far.
    pub fn prepares_answered(&self) -> u64 {
        self.prepared.load(Ordering::SeqCst)
    }

    /// A client for one node.
    pub fn client(&self, connect_timeout: Duration) -> GatedParticipants {
        GatedParticipants { grpc: GrpcParticipants::new(connect_timeout), gate: self.clone() }
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
        let vote = self.grpc.prepare(target, txn_id, payload, deadline_unix_ms, timeout).await;
        self.gate.prepared.fetch_add(1, Ordering::SeqCst);
        let mut held = self.gate.hold_after_prepare.subscribe();
        // An error means the gate is gone with the test: stop holding.
        let _ = held.wait_for(|hold| !hold).await;
        vote
    }

    async fn decide(
        &self,
        target: &Target,
        txn_id: TxnId,
        decision: Decision,
        timeout: Duration,
    ) -> Result<(), CallError> {
        if self.gate.fail_decides.load(Ordering::SeqCst) {
            return Err(CallError {
                participant: target.participant.clone(),
                addr: target.addr.clone(),
                message: "decide held by the test gate".into(),
            });
        }
        self.grpc.decide(target, txn_id, decision, timeout).await
    }
}

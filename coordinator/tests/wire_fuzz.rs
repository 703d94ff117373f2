//! The coordinator's wire boundary under arbitrary input (I6, docs/PROTOCOL.md
//! §10): a log entry or a snapshot decodes any bytes to a value or an error,
//! never a panic; a value that encodes decodes to the same value; a snapshot
//! that decodes re-encodes to one that decodes to the same state (interactive
//! txns, begun and joined, included); the client API's request conversions
//! (Submit, Begin, Join, Commit, Rollback, listings) answer any request with a
//! value or `InvalidArgument`.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use twopc_coordinator::Error;
use twopc_coordinator::command::{Command, DecideCmd, Proposal};
use twopc_coordinator::config::EngineConfig;
use twopc_coordinator::engine::{
    BeginRequest, CommitRequest, JoinRequest, ListRequest, RollbackRequest, SubmitRequest, parse_txn_id,
};
use twopc_coordinator::state_machine::StateMachine;
use twopc_proto::{Decision, ParticipantId, TxnId, Vote, pb};

fn txn_id() -> impl Strategy<Value = TxnId> {
    // A few creation times, so that sequences of entries meet the same txn again.
    (prop_oneof![Just(1_000u64), Just(2_000), 0u64..(1 << 48)], any::<[u8; 10]>().prop_map(|r| [r[0] & 1; 10]))
        .prop_map(|(ms, random)| TxnId::from_parts(ms, random))
}

fn participant() -> impl Strategy<Value = ParticipantId> {
    "[a-z0-9][a-z0-9._-]{0,12}".prop_map(|name| name.parse().expect("the regex makes valid names"))
}

fn vote() -> impl Strategy<Value = Option<Vote>> {
    prop_oneof![Just(None), Just(Some(Vote::Yes)), ".{0,40}".prop_map(|reason| Some(Vote::no(reason)))]
}

fn decision() -> impl Strategy<Value = Decision> {
    prop_oneof![Just(Decision::Commit), Just(Decision::Abort)]
}

fn command() -> impl Strategy<Value = Command> {
    let decide = (txn_id(), decision(), ".{0,40}", proptest::collection::vec((participant(), vote()), 0..4)).prop_map(
        |(txn_id, decision, reason, branches)| {
            Command::Decide(DecideCmd { txn_id, decision, reason, branches, payload_digests: Vec::new() })
        },
    );
    prop_oneof![
        4 => decide,
        2 => proptest::collection::vec((txn_id(), participant()), 0..4).prop_map(Command::Acknowledge),
        1 => any::<u64>().prop_map(|horizon_unix_ms| Command::Forget { horizon_unix_ms }),
        1 => (participant(), "[a-z0-9.:]{0,30}").prop_map(|(name, addr)| Command::RegisterParticipant { name, addr }),
        1 => participant().prop_map(|name| Command::RemoveParticipant { name }),
        // Deadlines near the few creation times, so Joins and Decides meet them before and after.
        2 => (txn_id(), prop_oneof![Just(1_500u64), Just(2_500), any::<u64>()])
            .prop_map(|(txn_id, deadline_unix_ms)| Command::Begin { txn_id, deadline_unix_ms }),
        3 => (txn_id(), participant()).prop_map(|(txn_id, participant)| Command::Join { txn_id, participant }),
    ]
}

fn proposal() -> impl Strategy<Value = Proposal> {
    let proposed = prop_oneof![Just(1_000u64), Just(2_000), Just(3_000), any::<u64>()];
    (command(), proposed).prop_map(|(command, proposed_unix_ms)| Proposal { command, proposed_unix_ms })
}

/// The state after applying `proposals` from index 1, as every replica would.
fn state_after(proposals: &[Proposal]) -> StateMachine {
    let mut sm = StateMachine::new(BTreeMap::from([(1, "127.0.0.1:7001".to_owned())]));
    for (index, proposal) in (1..).zip(proposals) {
        sm.apply(index, proposal);
    }
    sm
}

/// A decoded snapshot must survive its own round trip unchanged.
fn assert_restores_itself(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(sm) = StateMachine::from_snapshot(bytes) {
        let again = StateMachine::from_snapshot(&sm.to_snapshot()).expect("a snapshot we wrote decodes");
        prop_assert_eq!(again, sm);
    }
    Ok(())
}

proptest! {
    #[test]
    fn a_log_entry_decodes_any_bytes_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Proposal::decode(&bytes);
    }

    #[test]
    fn a_log_entry_round_trips(proposal in proposal()) {
        prop_assert_eq!(Proposal::decode(&proposal.encode()).expect("decodes"), proposal);
    }

    #[test]
    fn a_snapshot_decodes_any_bytes_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        assert_restores_itself(&bytes)?;
    }

    #[test]
    fn a_snapshot_round_trips_the_state_any_log_leaves(proposals in proptest::collection::vec(proposal(), 0..24)) {
        let sm = state_after(&proposals);
        prop_assert_eq!(StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes"), sm);
    }

    // Protobuf merges concatenated messages (repeated fields append), so two
    // snapshots glued together are one valid encoding that may hold a txn twice.
    #[test]
    fn a_snapshot_made_of_two_decodes_to_an_error_or_a_state_that_restores_itself(
        a in proptest::collection::vec(proposal(), 0..12),
        b in proptest::collection::vec(proposal(), 0..12),
    ) {
        let mut bytes = state_after(&a).to_snapshot();
        bytes.extend(state_after(&b).to_snapshot());
        assert_restores_itself(&bytes)?;
    }

    #[test]
    fn a_corrupted_snapshot_decodes_to_an_error_or_a_state_that_restores_itself(
        proposals in proptest::collection::vec(proposal(), 1..12),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = state_after(&proposals).to_snapshot();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte;
        }
        assert_restores_itself(&bytes)?;
    }
}

fn wire_txn_id() -> impl Strategy<Value = String> {
    prop_oneof![3 => txn_id().prop_map(|id| id.to_string()), 1 => ".{0,48}"]
}

fn wire_participant() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z0-9][a-z0-9._-]{0,12}", 1 => ".{0,80}"]
}

fn wire_branches() -> impl Strategy<Value = Vec<pb::Branch>> {
    let branch = (wire_participant(), proptest::collection::vec(any::<u8>(), 0..64))
        .prop_map(|(participant, payload)| pb::Branch { participant, payload: Bytes::from(payload) });
    proptest::collection::vec(branch, 0..20)
}

fn submit_request() -> impl Strategy<Value = pb::SubmitRequest> {
    (wire_txn_id(), wire_branches(), any::<u64>()).prop_map(|(txn_id, branches, deadline_unix_ms)| pb::SubmitRequest {
        txn_id,
        branches,
        deadline_unix_ms,
    })
}

fn timeout_ms() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 1u64..60_000, any::<u64>()]
}

proptest! {
    #[test]
    fn a_submit_converts_or_is_refused_as_invalid(request in submit_request()) {
        let limits = EngineConfig::default();
        if let Err(err) = SubmitRequest::from_pb(request.clone(), &limits) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{request:?} gave {err:?}");
        }
    }

    #[test]
    fn a_begin_converts_or_is_refused_as_invalid(
        txn_id in prop_oneof![Just(String::new()), wire_txn_id()],
        timeout_ms in timeout_ms(),
    ) {
        let request = pb::BeginRequest { txn_id, timeout_ms };
        if let Err(err) = BeginRequest::from_pb(&request, &EngineConfig::default()) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{request:?} gave {err:?}");
        }
    }

    #[test]
    fn a_join_converts_or_is_refused_as_invalid(txn_id in wire_txn_id(), participant in wire_participant()) {
        let request = pb::JoinRequest { txn_id, participant };
        if let Err(err) = JoinRequest::from_pb(&request, &EngineConfig::default()) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{request:?} gave {err:?}");
        }
    }

    #[test]
    fn a_commit_converts_or_is_refused_as_invalid(txn_id in wire_txn_id(), branches in wire_branches()) {
        let request = pb::CommitRequest { txn_id, branches };
        if let Err(err) = CommitRequest::from_pb(request.clone(), &EngineConfig::default()) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{request:?} gave {err:?}");
        }
    }

    #[test]
    fn a_rollback_converts_or_is_refused_as_invalid(txn_id in wire_txn_id(), reason in ".{0,600}") {
        let request = pb::RollbackRequest { txn_id, reason };
        match RollbackRequest::from_pb(&request, &EngineConfig::default()) {
            // The logged reason is never cut (§10).
            Ok(rollback) => prop_assert!(rollback.reason.len() <= twopc_coordinator::command::REASON_MAX_BYTES),
            Err(err) => prop_assert!(matches!(err, Error::InvalidArgument(_)), "{request:?} gave {err:?}"),
        }
    }

    #[test]
    fn a_listing_request_converts_or_is_refused_as_invalid(
        filter in any::<i32>(),
        older_than_ms in any::<u64>(),
        limit in any::<u32>(),
        after_txn_id in prop_oneof![Just(String::new()), wire_txn_id()],
    ) {
        let request = pb::ListTransactionsRequest { filter, older_than_ms, limit, after_txn_id };
        if let Err(err) = ListRequest::from_pb(&request) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{request:?} gave {err:?}");
        }
    }

    #[test]
    fn a_txn_id_parses_or_is_refused_as_invalid(text in ".{0,64}") {
        if let Err(err) = parse_txn_id(&text) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{text:?} gave {err:?}");
        }
    }
}

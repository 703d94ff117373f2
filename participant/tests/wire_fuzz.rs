//! The participant server's wire boundary under arbitrary requests (I6,
//! docs/PROTOCOL.md §3.4): Prepare, Decide and their batches, with any txn
//! ids, names, payloads, deadlines and decision values, sent over gRPC in
//! any order, are answered with a vote, a success or a documented status
//! code, never a panic (which tonic would report as `UNKNOWN` or a dropped
//! stream); and the server still serves afterwards.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{ID, config, dead_addr, start};
use proptest::prelude::*;
use tonic::Code;
use twopc_participant::{MemoryResource, TxnId};
use twopc_proto::pb::{
    DecideBatchRequest, DecisionItem, DecisionRequest, PrepareBatchRequest, PrepareItem, PrepareRequest,
};
use twopc_proto::txn_id::unix_now_ms;

/// The codes docs/PROTOCOL.md §3.4 lists (the resource here never fails, so no UNAVAILABLE).
const DOCUMENTED: [Code; 4] = [Code::Ok, Code::InvalidArgument, Code::FailedPrecondition, Code::ResourceExhausted];

#[derive(Debug, Clone)]
enum Call {
    Prepare(PrepareRequest),
    Decide(DecisionRequest),
    PrepareBatch(PrepareBatchRequest),
    DecideBatch(DecideBatchRequest),
}

fn txn_id(known: Vec<TxnId>) -> impl Strategy<Value = String> {
    // Mostly a few valid ids, so calls meet the same txn again; sometimes anything.
    prop_oneof![4 => proptest::sample::select(known).prop_map(|id| id.to_string()), 1 => ".{0,48}"]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![6 => Just(ID.to_owned()), 1 => ".{0,80}"]
}

fn deadline() -> impl Strategy<Value = u64> {
    let now = unix_now_ms();
    prop_oneof![4 => Just(now + 60_000), 1 => Just(0u64), 1 => Just(now.saturating_sub(1_000)), 1 => any::<u64>()]
}

fn payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from)
}

fn decision() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 1..=2i32, 1 => any::<i32>()]
}

fn call(known: Vec<TxnId>) -> impl Strategy<Value = Call> {
    let prepare_item = (txn_id(known.clone()), payload(), deadline())
        .prop_map(|(txn_id, payload, deadline_unix_ms)| PrepareItem { txn_id, payload, deadline_unix_ms });
    let decision_item =
        (txn_id(known.clone()), decision()).prop_map(|(txn_id, decision)| DecisionItem { txn_id, decision });
    prop_oneof![
        (txn_id(known.clone()), name(), payload(), deadline()).prop_map(
            |(txn_id, participant, payload, deadline_unix_ms)| {
                Call::Prepare(PrepareRequest { txn_id, participant, payload, deadline_unix_ms })
            }
        ),
        (txn_id(known), name(), decision()).prop_map(|(txn_id, participant, decision)| Call::Decide(DecisionRequest {
            txn_id,
            participant,
            decision
        })),
        (name(), proptest::collection::vec(prepare_item, 0..6))
            .prop_map(|(participant, prepares)| Call::PrepareBatch(PrepareBatchRequest { participant, prepares })),
        (name(), proptest::collection::vec(decision_item, 0..6))
            .prop_map(|(participant, decisions)| Call::DecideBatch(DecideBatchRequest { participant, decisions })),
    ]
}

fn calls() -> impl Strategy<Value = Vec<Call>> {
    let known: Vec<TxnId> = (0..4).map(|_| TxnId::new()).collect();
    proptest::collection::vec(call(known), 1..16)
}

/// Sends one call; checks every status it carries is documented.
async fn send(p: &common::Running, call: Call) -> Result<(), TestCaseError> {
    let mut client = p.client.clone();
    let (whole, items): (Code, Vec<i32>) = match call.clone() {
        Call::Prepare(r) => (client.prepare(r).await.err().map_or(Code::Ok, |s| s.code()), Vec::new()),
        Call::Decide(r) => (client.decide(r).await.err().map_or(Code::Ok, |s| s.code()), Vec::new()),
        Call::PrepareBatch(r) => match client.prepare_batch(r).await {
            Ok(answer) => (Code::Ok, answer.into_inner().results.iter().map(|r| r.code).collect()),
            Err(status) => (status.code(), Vec::new()),
        },
        Call::DecideBatch(r) => match client.decide_batch(r).await {
            Ok(answer) => (Code::Ok, answer.into_inner().results.iter().map(|r| r.code).collect()),
            Err(status) => (status.code(), Vec::new()),
        },
    };
    prop_assert!(DOCUMENTED.contains(&whole), "{call:?} answered {whole:?}");
    for code in items {
        prop_assert!(DOCUMENTED.contains(&Code::from_i32(code)), "{call:?} answered an item with code {code}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_requests_gets_documented_answers_and_the_server_keeps_serving(calls in calls()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let resource = Arc::new(MemoryResource::new());
            let p = start(Arc::clone(&resource), config(vec![dead_addr().await.expect("address")])).await.expect("start");
            for call in calls {
                send(&p, call).await?;
            }
            // Still serving: a fresh, well-formed Prepare gets a vote.
            let fresh = PrepareRequest {
                txn_id: TxnId::new().to_string(),
                participant: ID.into(),
                payload: Bytes::from_static(b"ok"),
                deadline_unix_ms: unix_now_ms() + 60_000,
            };
            prop_assert!(p.client.clone().prepare(fresh).await.is_ok(), "the server stopped serving");
            p.stop().await.expect("stops cleanly");
            Ok(())
        })?;
    }
}

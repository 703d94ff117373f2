//! The participant server's wire boundary under arbitrary requests (I6,
//! docs/PROTOCOL.md §3.4): Prepare, Decide and their batches, with any txn
//! ids, names, payloads, deadlines and decision values, sent over gRPC in
//! any order, are answered with a vote, a success or a documented status
//! code, never a panic (which tonic would report as `UNKNOWN` or a dropped
//! stream); and the server still serves afterwards.
//!
//! The same for a service's own calls that join txns (§12.2, §12.3): any
//! `twopc-txn` header values (absent, well-formed, malformed, repeated, not
//! ASCII, any deadline) reach the context interceptor and the joiner, which
//! answer with a documented code; and afterwards exactly the branches the
//! coordinator logged as joined are held.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{ID, config, dead_addr, start, start_joining};
use proptest::prelude::*;
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use twopc_participant::fake_coordinator::FakeCoordinator;
use twopc_participant::{MemoryResource, TxnId};
use twopc_proto::context::TXN_CONTEXT_METADATA_KEY;
use twopc_proto::pb::MoveRequest;
use twopc_proto::pb::bank_client::BankClient;
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

/// The codes a joining call may answer when the coordinator answers every
/// Join (§12.2, §12.3): joined, a malformed context, or a refusal (no
/// context, NO vote, a second branch, a refused join).
const JOIN_DOCUMENTED: [Code; 3] = [Code::Ok, Code::InvalidArgument, Code::FailedPrecondition];

/// One `twopc-txn` header: absent, or one or two raw values.
#[derive(Debug, Clone)]
struct Header(Vec<Vec<u8>>);

fn header_value(known: Vec<TxnId>) -> impl Strategy<Value = Vec<u8>> {
    let now = unix_now_ms();
    let id = prop_oneof![
        4 => proptest::sample::select(known).prop_map(|id| id.to_string()),
        1 => Just(TxnId::new().to_string()),
        1 => "[0-9a-f-]{0,40}",
    ];
    let deadline = prop_oneof![
        4 => Just(now + 60_000),
        1 => Just(0u64),
        1 => Just(1u64),
        1 => Just(now.saturating_sub(1_000)),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ];
    prop_oneof![
        6 => (id.clone(), deadline).prop_map(|(id, d)| format!("{id};deadline={d}").into_bytes()),
        1 => (id.clone(), "[ ;=a-z0-9]{0,24}").prop_map(|(id, tail)| format!("{id}{tail}").into_bytes()),
        1 => id.prop_map(|id| format!(" {id} ; deadline= 5 ").into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

fn header(known: Vec<TxnId>) -> impl Strategy<Value = Header> {
    prop_oneof![
        1 => Just(Header(Vec::new())),
        6 => header_value(known.clone()).prop_map(|v| Header(vec![v])),
        1 => proptest::collection::vec(header_value(known), 2).prop_map(Header),
    ]
}

fn account() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just("ok".to_owned()), 1 => Just("no:insufficient funds".to_owned()), 1 => ".{0,40}"]
}

/// Sends one Debit with `header`; checks its status is documented. Values
/// that cannot travel as a header at all (control characters) are sent
/// without that value: the transport refuses them before the server.
async fn send_debit(
    client: &mut BankClient<tonic::transport::Channel>,
    header: &Header,
    account: String,
) -> Result<(), TestCaseError> {
    let mut request = tonic::Request::new(MoveRequest { account, amount_minor: 1 });
    for raw in &header.0 {
        if let Ok(value) = AsciiMetadataValue::try_from(raw.as_slice()) {
            request.metadata_mut().append(TXN_CONTEXT_METADATA_KEY, value);
        }
    }
    let code = client.debit(request).await.err().map_or(Code::Ok, |s| s.code());
    prop_assert!(JOIN_DOCUMENTED.contains(&code), "{header:?} answered {code:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_txn_context_gets_a_documented_answer_and_only_joined_branches_are_held(
        calls in {
            let known: Vec<TxnId> = (0..3).map(|_| TxnId::new()).collect();
            (Just(known.clone()), proptest::collection::vec((header(known), account()), 1..12))
        }
    ) {
        let (known, calls) = calls;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let fake = FakeCoordinator::new();
            let node = fake.start().await.expect("fake coordinator");
            // Two of the three known txns are begun; the third is unknown to the coordinator.
            for txn in &known[..2] {
                fake.begin(*txn, unix_now_ms() + 60_000);
            }
            let resource = Arc::new(MemoryResource::new());
            let (p, _joiner) = start_joining(Arc::clone(&resource), config(vec![node.addr().to_string()]))
                .await
                .expect("start");
            let mut client = BankClient::connect(format!("http://{}", p.addr)).await.expect("connect");
            for (header, account) in calls {
                send_debit(&mut client, &header, account).await?;
            }
            // I4 and §12.3: a branch is held here exactly when the coordinator logged its join.
            for txn in known {
                let joined = fake.joined(txn) == vec![ID.to_owned()];
                prop_assert_eq!(resource.is_prepared(txn), joined, "txn {}", txn);
            }
            // Still serving.
            let fresh = MetadataValue::try_from(format!("{};deadline={}", TxnId::new(), unix_now_ms() + 60_000))
                .expect("ascii");
            let mut request = tonic::Request::new(MoveRequest { account: "ok".into(), amount_minor: 1 });
            request.metadata_mut().insert(TXN_CONTEXT_METADATA_KEY, fresh);
            let code = client.debit(request).await.err().map(|s| s.code());
            prop_assert_eq!(code, Some(Code::FailedPrecondition), "an unknown txn is refused");
            p.stop().await.expect("stops cleanly");
            drop(node);
            Ok(())
        })?;
    }
}

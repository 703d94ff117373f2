//! Malformed and misaddressed requests to the real server over gRPC get the
//! documented status codes (crate docs, "Status codes") and never reach the
//! resource.

mod common;

use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use common::{ID, Running, config, dead_addr, prepare_request, start};
use tonic::Code;
use twopc_participant::{Decision, MemoryResource, TxnId};
use twopc_proto::pb::{
    DecideBatchRequest, DecisionItem, DecisionRequest, PrepareBatchRequest, PrepareItem, PrepareRequest,
};
use twopc_proto::txn_id::unix_now_ms;

async fn participant(resource: &Arc<MemoryResource>) -> anyhow::Result<Running> {
    let mut config = config(vec![dead_addr().await?]);
    config.payload_max_bytes = 16;
    start(Arc::clone(resource), config).await
}

async fn prepare_code(p: &Running, request: PrepareRequest) -> anyhow::Result<tonic::Status> {
    match p.client.clone().prepare(request).await {
        Ok(response) => anyhow::bail!("expected an error, got {:?}", response.into_inner()),
        Err(status) => Ok(status),
    }
}

async fn decide_code(p: &Running, request: DecisionRequest) -> anyhow::Result<tonic::Status> {
    match p.client.clone().decide(request).await {
        Ok(_) => anyhow::bail!("expected an error, got OK"),
        Err(status) => Ok(status),
    }
}

fn decision_request(txn_id: &str, decision: i32) -> DecisionRequest {
    DecisionRequest { txn_id: txn_id.into(), participant: ID.into(), decision }
}

// I6 (bad input is refused clearly): an empty, malformed or non-v7 txn id is INVALID_ARGUMENT,
// for Prepare and for Decide, naming the field.
#[tokio::test]
async fn bad_txn_ids_are_invalid_argument() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let v4 = "67e55044-10b1-426f-9247-bb680e5fe0c8";
    for bad in ["", "not-a-txn-id", v4] {
        let mut request = prepare_request(TxnId::new(), b"ok");
        request.txn_id = bad.into();
        let status = prepare_code(&p, request).await?;
        assert_eq!(status.code(), Code::InvalidArgument, "prepare {bad:?}: {status:?}");
        assert!(status.message().starts_with("txn_id:"), "{status:?}");

        let status = decide_code(&p, decision_request(bad, Decision::Abort.into())).await?;
        assert_eq!(status.code(), Code::InvalidArgument, "decide {bad:?}: {status:?}");
    }
    assert_eq!(p.metrics.snapshot().prepares, 0);
    p.stop().await
}

// I6 (bounded payload): a payload over payload_max_bytes is INVALID_ARGUMENT saying the limit;
// one at the limit is accepted.
#[tokio::test]
async fn oversize_payload_is_invalid_argument_naming_the_limit() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let txn = TxnId::new();
    let mut request = prepare_request(txn, b"");
    request.payload = Bytes::from(vec![b'x'; 17]);
    let status = prepare_code(&p, request).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("limit of 16 bytes"), "{status:?}");
    assert_eq!(resource.prepare_calls(txn), 0);

    let mut request = prepare_request(txn, b"");
    request.payload = Bytes::from(vec![b'x'; 16]);
    let response = p.client.clone().prepare(request).await?;
    assert!(common::vote(response.get_ref())?.is_yes());
    p.stop().await
}

// docs/PROTOCOL.md §7.1: a Prepare must carry its deadline; 0 is INVALID_ARGUMENT.
#[tokio::test]
async fn missing_deadline_is_invalid_argument() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let txn = TxnId::new();
    let mut request = prepare_request(txn, b"ok");
    request.deadline_unix_ms = 0;
    let status = prepare_code(&p, request).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("deadline_unix_ms"), "{status:?}");
    assert_eq!(resource.prepare_calls(txn), 0);
    p.stop().await
}

// I2 (one decision): an unspecified or unknown decision value is INVALID_ARGUMENT, never guessed.
#[tokio::test]
async fn unknown_decision_value_is_invalid_argument() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let txn = TxnId::new();
    p.prepare(txn, b"ok").await?;
    for bad in [0, 3, 99, -1] {
        let status = decide_code(&p, decision_request(&txn.to_string(), bad)).await?;
        assert_eq!(status.code(), Code::InvalidArgument, "decision {bad}: {status:?}");
        assert!(status.message().starts_with("decision:"), "{status:?}");
    }
    assert_eq!(resource.commit_calls(txn) + resource.abort_calls(txn), 0);
    assert!(resource.is_prepared(txn));
    p.stop().await
}

// I1 (atomicity): Commit for a txn never prepared here is FAILED_PRECONDITION and applies nothing.
#[tokio::test]
async fn commit_of_never_prepared_txn_is_failed_precondition() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let txn = TxnId::new();
    let status = decide_code(&p, decision_request(&txn.to_string(), Decision::Commit.into())).await?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("never prepared"), "{status:?}");
    assert_eq!(resource.commit_count(txn), 0);
    p.stop().await
}

// I1: a request addressed to another participant is FAILED_PRECONDITION and changes nothing;
// an empty name skips the check.
#[tokio::test]
async fn wrong_participant_name_is_failed_precondition() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let txn = TxnId::new();
    let mut request = prepare_request(txn, b"ok");
    request.participant = "bank-b".into();
    let status = prepare_code(&p, request).await?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("bank-b"), "{status:?}");
    assert_eq!(resource.prepare_calls(txn), 0);

    let mut request = decision_request(&txn.to_string(), Decision::Abort.into());
    request.participant = "bank-b".into();
    let status = decide_code(&p, request).await?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(resource.abort_calls(txn), 0);

    let mut request = prepare_request(txn, b"ok");
    request.participant = String::new();
    let response = p.client.clone().prepare(request).await?;
    assert!(common::vote(response.get_ref())?.is_yes());
    p.stop().await
}

// I2 (one decision): a decision contradicting the recorded one is FAILED_PRECONDITION, in both
// directions, and after a NO vote; the recorded outcome stands.
#[tokio::test]
async fn conflicting_decision_is_failed_precondition() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let (committed, aborted, refused) = (TxnId::new(), TxnId::new(), TxnId::new());
    p.prepare(committed, b"ok").await?;
    p.prepare(aborted, b"ok").await?;
    p.prepare(refused, b"no:broke").await?;
    p.decide(committed, Decision::Commit).await?;
    p.decide(aborted, Decision::Abort).await?;

    for (txn, decision) in [(committed, Decision::Abort), (aborted, Decision::Commit), (refused, Decision::Commit)] {
        let status = decide_code(&p, decision_request(&txn.to_string(), decision.into())).await?;
        assert_eq!(status.code(), Code::FailedPrecondition, "{decision} {status:?}");
    }
    assert_eq!(resource.commit_count(committed), 1);
    assert_eq!(resource.commit_count(aborted), 0);
    assert_eq!(resource.commit_count(refused), 0);
    assert_eq!(resource.abort_calls(committed), 0, "memory should refuse before the resource");
    p.stop().await
}

// I6 (bounded): a DecideBatch with no decisions, or more than decide_batch_max, is
// INVALID_ARGUMENT naming the limit; one misaddressed is FAILED_PRECONDITION. Nothing is applied.
#[tokio::test]
async fn empty_oversize_or_misaddressed_batches_are_refused_whole() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let mut config = config(vec![dead_addr().await?]);
    config.decide_batch_max = 2;
    let p = start(Arc::clone(&resource), config).await?;
    let txn = TxnId::new();
    p.prepare(txn, b"ok").await?;
    let commit = (txn.to_string(), i32::from(Decision::Commit));

    for decisions in [vec![], vec![commit.clone(); 3]] {
        let count = decisions.len();
        let status = p.decide_batch(&decisions).await.err().context("expected an error")?;
        assert_eq!(status.code(), Code::InvalidArgument, "{count} decisions: {status:?}");
        assert!(status.message().contains("1 to 2 (decide_batch_max)"), "{status:?}");
    }
    let item = DecisionItem { txn_id: txn.to_string(), decision: Decision::Commit.into() };
    let misaddressed = DecideBatchRequest { participant: "bank-b".into(), decisions: vec![item] };
    let status = p.client.clone().decide_batch(misaddressed).await.err().context("expected an error")?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(resource.commit_calls(txn), 0);
    assert!(resource.is_prepared(txn));
    p.stop().await
}

// I1/I6: in a DecideBatch each decision gets the code its own Decide would: a malformed txn id
// or decision is INVALID_ARGUMENT, a Commit never prepared FAILED_PRECONDITION, and the good
// decision beside them is carried out.
#[tokio::test]
async fn each_decision_of_a_batch_gets_its_own_code() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let (prepared, never) = (TxnId::new(), TxnId::new());
    p.prepare(prepared, b"ok").await?;
    let commit = i32::from(Decision::Commit);
    let decisions = [
        ("not-a-txn-id".to_owned(), commit),
        (prepared.to_string(), 7),
        (never.to_string(), commit),
        (prepared.to_string(), commit),
    ];
    let results = p.decide_batch(&decisions).await?;
    let codes: Vec<Code> = results.iter().map(|r| Code::from_i32(r.code)).collect();
    assert_eq!(codes, [Code::InvalidArgument, Code::InvalidArgument, Code::FailedPrecondition, Code::Ok]);
    assert!(results[0].message.starts_with("txn_id:"), "{results:?}");
    assert!(results[1].message.starts_with("decision:"), "{results:?}");
    assert!(results[2].message.contains("never prepared"), "{results:?}");
    let echoed: Vec<&str> = results.iter().map(|r| r.txn_id.as_str()).collect();
    let sent: Vec<&str> = decisions.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(echoed, sent);
    assert_eq!(resource.commit_count(prepared), 1);
    assert_eq!(resource.commit_count(never), 0);
    p.stop().await
}

fn prepare_item(txn_id: String, payload: &'static [u8]) -> PrepareItem {
    PrepareItem { txn_id, payload: Bytes::from_static(payload), deadline_unix_ms: unix_now_ms() + 60_000 }
}

// I6 (bounded): a PrepareBatch with no Prepares, or more than prepare_batch_max, is
// INVALID_ARGUMENT naming the limit; one misaddressed is FAILED_PRECONDITION. The resource is
// not called.
#[tokio::test]
async fn empty_oversize_or_misaddressed_prepare_batches_are_refused_whole() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let mut config = config(vec![dead_addr().await?]);
    config.prepare_batch_max = 2;
    let p = start(Arc::clone(&resource), config).await?;
    let txn = TxnId::new();
    let batch = |participant: &str, count: usize| PrepareBatchRequest {
        participant: participant.into(),
        prepares: (0..count).map(|_| prepare_item(txn.to_string(), b"ok")).collect(),
    };
    for count in [0, 3] {
        let status = p.client.clone().prepare_batch(batch(ID, count)).await.err().context("expected an error")?;
        assert_eq!(status.code(), Code::InvalidArgument, "{count} prepares: {status:?}");
        assert!(status.message().contains("1 to 2 (prepare_batch_max)"), "{status:?}");
    }
    let status = p.client.clone().prepare_batch(batch("bank-b", 1)).await.err().context("expected an error")?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(resource.prepare_calls(txn), 0);
    p.stop().await
}

// I3/I6: in a PrepareBatch each Prepare gets what its own Prepare would: a malformed txn id,
// an oversize payload or a missing deadline is INVALID_ARGUMENT; the others are voted on,
// YES or NO with the reason, and each result names its txn.
#[tokio::test]
async fn each_prepare_of_a_batch_gets_its_own_answer() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = participant(&resource).await?;
    let (yes, no, oversize, undated) = (TxnId::new(), TxnId::new(), TxnId::new(), TxnId::new());
    let mut missing_deadline = prepare_item(undated.to_string(), b"ok");
    missing_deadline.deadline_unix_ms = 0;
    let prepares = vec![
        prepare_item("not-a-txn-id".into(), b"ok"),
        prepare_item(oversize.to_string(), b"seventeen bytes!!"),
        missing_deadline,
        prepare_item(no.to_string(), b"no:broke"),
        prepare_item(yes.to_string(), b"ok"),
    ];
    let sent: Vec<String> = prepares.iter().map(|p| p.txn_id.clone()).collect();
    let request = PrepareBatchRequest { participant: ID.into(), prepares };
    let results = p.client.clone().prepare_batch(request).await?.into_inner().results;
    let codes: Vec<Code> = results.iter().map(|r| Code::from_i32(r.code)).collect();
    assert_eq!(codes, [Code::InvalidArgument, Code::InvalidArgument, Code::InvalidArgument, Code::Ok, Code::Ok]);
    assert!(results[0].message.starts_with("txn_id:"), "{results:?}");
    assert!(results[1].message.contains("limit of 16 bytes"), "{results:?}");
    assert!(results[2].message.contains("deadline_unix_ms"), "{results:?}");
    let votes: Vec<_> = results[3..].iter().map(|r| twopc_participant::Vote::from_pb(r.vote, &r.reason)).collect();
    assert_eq!(votes, [Ok(twopc_participant::Vote::no("broke")), Ok(twopc_participant::Vote::Yes)]);
    let echoed: Vec<&String> = results.iter().map(|r| &r.txn_id).collect();
    assert_eq!(echoed, sent.iter().collect::<Vec<_>>());
    assert!(resource.is_prepared(yes));
    assert_eq!(resource.prepare_calls(oversize) + resource.prepare_calls(undated), 0);
    p.stop().await
}

// I6: an invalid config is refused at start-up with a message naming the field.
#[tokio::test]
async fn invalid_config_is_refused_at_start() -> anyhow::Result<()> {
    let mut config = config(vec![dead_addr().await?]);
    config.prepare_inflight_max = 0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let resource = Arc::new(MemoryResource::new());
    let result = twopc_participant::run(listener, resource, config, std::future::pending()).await;
    match result {
        Err(twopc_participant::Error::Config(why)) => assert!(why.contains("prepare_inflight_max")),
        other => anyhow::bail!("expected a config error, got {other:?}"),
    }
    Ok(())
}

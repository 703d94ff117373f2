//! I6 (bounded) and §7.1 (deadlines) at the gRPC server: past a limit
//! the caller gets RESOURCE_EXHAUSTED, never a crash or a queue; a Prepare
//! after its deadline votes NO.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::{GatedResource, config, dead_addr, prepare_request, start, vote, wait_until, within};
use tokio::sync::watch;
use twopc_participant::{Decision, MemoryResource, Resource, ResourceError, TxnId, Vote};

// I6: with prepare_inflight_max Prepares running, another gets RESOURCE_EXHAUSTED at once;
// the running ones finish normally and the slot is reusable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepares_beyond_the_inflight_limit_are_resource_exhausted() -> anyhow::Result<()> {
    let resource = Arc::new(GatedResource::new(MemoryResource::new()));
    let mut config = config(vec![dead_addr().await?]);
    config.prepare_inflight_max = 1;
    let p = Arc::new(start(Arc::clone(&resource), config).await?);

    resource.hold_prepares();
    let (held, refused) = (TxnId::new(), TxnId::new());
    let first = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.prepare(held, b"ok").await })
    };
    wait_until("the first prepare is held", || resource.prepares_held() == 1).await?;

    let status = p.prepare(refused, b"ok").await;
    let status = status.err().map(|s| s.code());
    assert_eq!(status, Some(tonic::Code::ResourceExhausted));
    assert_eq!(resource.inner.prepare_calls(refused), 0);

    resource.release_prepares();
    let first = within("the held prepare", first).await???;
    assert_eq!(vote(&first)?, Vote::Yes);
    assert_eq!(vote(&p.prepare(refused, b"ok").await?)?, Vote::Yes);
    Ok(())
}

// I6 and I4: the outcome memory holds at most outcome_memory_max txns; prepared branches are
// never evicted, so a memory full of them refuses new Prepares with RESOURCE_EXHAUSTED; once a
// branch is decided, its finished entry makes room at once (the resource keeps its own record).
#[tokio::test]
async fn outcome_memory_full_of_prepared_branches_refuses_new_prepares() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let mut config = config(vec![dead_addr().await?]);
    config.outcome_memory_max = 1;
    let p = start(Arc::clone(&resource), config).await?;
    let (held, waiting) = (TxnId::new(), TxnId::new());
    assert_eq!(vote(&p.prepare(held, b"ok").await?)?, Vote::Yes);

    let status = p.prepare(waiting, b"ok").await.err().map(|s| s.code());
    assert_eq!(status, Some(tonic::Code::ResourceExhausted));
    assert_eq!(resource.prepare_calls(waiting), 0);

    p.decide(held, Decision::Commit).await?;
    assert_eq!(vote(&p.prepare(waiting, b"ok").await?)?, Vote::Yes, "the finished entry made room");
    // The evicted txn is still answered correctly, from the resource's own record.
    p.decide(held, Decision::Commit).await?;
    assert_eq!(resource.commit_count(held), 1);
    p.stop().await
}

// docs/PROTOCOL.md §7.1: a Prepare after its deadline votes NO "deadline passed" without reaching the
// resource, and the refusal is remembered (a repeat gets the same answer).
#[tokio::test]
async fn prepare_after_its_deadline_votes_no_and_is_remembered() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    for _ in 0..2 {
        let mut request = prepare_request(txn, b"ok");
        request.deadline_unix_ms = 1;
        let response = p.client.clone().prepare(request).await?.into_inner();
        assert_eq!(vote(&response)?, Vote::no("deadline passed"));
    }
    // Remembered: even with a fresh deadline the recorded NO stands.
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::no("deadline passed"));
    assert_eq!(resource.prepare_calls(txn), 0);
    assert_eq!(p.metrics.snapshot().votes_no, 1);
    p.stop().await
}

// docs/PROTOCOL.md §7.1 with a clock jump: the deadline is judged by the participant's own
// clock (ParticipantConfig::clock). Stepped two minutes ahead, it refuses a Prepare whose
// deadline is a minute away by the system clock; stepped back, it accepts the next one again.
#[tokio::test]
async fn the_deadline_is_judged_by_the_participants_own_clock() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let config = config(vec![dead_addr().await?]);
    let clock = config.clock.clone();
    let p = start(Arc::clone(&resource), config).await?;
    clock.jump_ms(120_000);
    let late = TxnId::new();
    assert_eq!(vote(&p.prepare(late, b"ok").await?)?, Vote::no("deadline passed"));
    clock.jump_ms(-120_000);
    let on_time = TxnId::new();
    assert_eq!(vote(&p.prepare(on_time, b"ok").await?)?, Vote::Yes);
    assert_eq!(resource.prepare_calls(late), 0);
    p.stop().await
}

/// A [`MemoryResource`] whose commits wait at a gate while it is closed, and
/// which counts how many commits are inside it at once.
struct CountingCommits {
    inner: MemoryResource,
    open: watch::Sender<bool>,
    inside: AtomicUsize,
    inside_max: AtomicUsize,
}

impl CountingCommits {
    fn closed() -> Self {
        Self {
            inner: MemoryResource::new(),
            open: watch::Sender::new(false),
            inside: AtomicUsize::new(0),
            inside_max: AtomicUsize::new(0),
        }
    }
}

impl Resource for CountingCommits {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        self.inner.prepare(txn, payload).await
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        let now_inside = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.inside_max.fetch_max(now_inside, Ordering::SeqCst);
        let _ = self.open.subscribe().wait_for(|open| *open).await;
        let committed = self.inner.commit(txn).await;
        self.inside.fetch_sub(1, Ordering::SeqCst);
        committed
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.inner.abort(txn).await
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        self.inner.prepared().await
    }
}

// I6: a DecideBatch carries up to decide_batch_max decisions, but at most
// decide_batch_concurrency_max of them reach the resource at once; the rest wait their turn,
// and every decision of the batch is still applied, once, with its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decide_batch_applies_at_most_the_concurrency_limit_at_once() -> anyhow::Result<()> {
    const LIMIT: usize = 4;
    let resource = Arc::new(CountingCommits::closed());
    let mut config = config(vec![dead_addr().await?]);
    config.decide_batch_concurrency_max = LIMIT;
    let p = Arc::new(start(Arc::clone(&resource), config).await?);
    let txns: Vec<TxnId> = (0..8 * LIMIT).map(|_| TxnId::new()).collect();
    for txn in &txns {
        assert_eq!(vote(&p.prepare(*txn, b"ok").await?)?, Vote::Yes);
    }

    let batch: Vec<(String, i32)> = txns.iter().map(|t| (t.to_string(), Decision::Commit.into())).collect();
    let deciding = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.decide_batch(&batch).await })
    };
    wait_until("the first commits wait at the gate", || resource.inside.load(Ordering::SeqCst) >= LIMIT).await?;
    resource.open.send_replace(true);
    let results = within("the batch", deciding).await???;

    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    assert!(txns.iter().all(|t| resource.inner.commit_count(*t) == 1));
    let most = resource.inside_max.load(Ordering::SeqCst);
    assert!(most <= LIMIT, "{most} commits ran at once; decide_batch_concurrency_max is {LIMIT}");
    Ok(())
}

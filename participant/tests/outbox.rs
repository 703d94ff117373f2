//! The transactional outbox (docs/PROTOCOL.md §14): [`EventResource`] passes
//! the conformance suite, and against the real NATS server (see
//! `nats_testing`) a committed branch's events reach the stream exactly
//! once, an aborted branch's never, events committed while the relay was
//! away go out after a restart, and a server that goes away only delays
//! them, within the outbox's bound. A server that requires TLS, client
//! certificates and a token gets events only from a relay that has all three;
//! one that requires an NKey, only with its seed, rotated without a restart.
//! The relay gathers events for `linger_ms` after a wake, and not after a
//! full batch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use twopc_participant::conformance::{self, Harness};
use twopc_participant::nats_testing::{self, NatsProxy, SecureNats, ServerAuth, ServerTlsFiles, TestNats};
use twopc_participant::outbox::{
    EventResource, EventResourceConfig, NatsAuth, NatsConnect, OutboxEvent, OutboxSource, Relay, RelayConfig,
    RelayWake, encode_staged,
};
use twopc_participant::{Resource, TxnId, Vote};

/// The event participant's limits, as participant `events`.
fn limits() -> EventResourceConfig {
    EventResourceConfig::new(&"events".parse().expect("a participant id"))
}

struct EventHarness {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

fn one_event(txn: TxnId) -> Bytes {
    let event = OutboxEvent::new("test.conformance", Bytes::from(txn.to_string())).expect("subject");
    encode_staged(&[event])
}

impl Harness for EventHarness {
    type Resource = EventResource;

    async fn create(&self) -> EventResource {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.redb");
        self.dirs.lock().push(dir);
        EventResource::open(path, limits(), RelayWake::new()).await.expect("open")
    }

    async fn restart(&self, resource: EventResource) -> EventResource {
        let path = resource.path().to_owned();
        drop(resource);
        EventResource::open(path, limits(), RelayWake::new()).await.expect("reopen")
    }

    fn yes_payload(&self, txn: TxnId) -> Bytes {
        one_event(txn)
    }

    fn no_payload(&self, _txn: TxnId) -> Bytes {
        Bytes::from_static(b"\xff\xff not a StagedEvents message")
    }

    async fn applied_count(&self, resource: &EventResource, txn: TxnId) -> u64 {
        let prefix = format!("{txn}:");
        let ready = resource.ready(usize::MAX).await.expect("ready events");
        ready.iter().filter(|e| e.id.starts_with(&prefix)).count() as u64
    }

    fn keeps_payload_digests(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn event_resource_passes_the_conformance_suite() {
    conformance::run_all(&EventHarness { dirs: Mutex::new(Vec::new()) }).await;
}

/// A throwaway stream and subject prefix on the test server.
struct Stream {
    nats: TestNats,
    name: String,
    prefix: String,
}

impl Stream {
    async fn new(test: &str) -> Option<Self> {
        let nats = nats_testing::server(test).await?;
        Some(Self { nats, name: nats_testing::unique_name("TEST"), prefix: nats_testing::unique_name("t") })
    }

    fn relay_config(&self, url: &str) -> RelayConfig {
        RelayConfig {
            stream: self.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            retry_max_ms: 200,
            poll_interval_ms: 100,
            ack_timeout_ms: 1_000,
            ..RelayConfig::new(url)
        }
    }

    fn events(&self, txn: TxnId, n: usize) -> Bytes {
        let events: Vec<_> = (0..n)
            .map(|i| OutboxEvent::new(format!("{}.acct{i}", self.prefix), Bytes::from(format!("{txn}/{i}"))))
            .collect::<Result<_, _>>()
            .expect("subjects");
        encode_staged(&events)
    }

    /// The ids in the stream, once it holds `n` messages.
    async fn ids(&self, n: u64) -> Vec<String> {
        let messages = self.nats.messages(&self.name, n, Duration::from_secs(20)).await;
        messages.into_iter().map(|(id, _, _)| id).collect()
    }
}

async fn resource(dir: &tempfile::TempDir, config: EventResourceConfig, wake: RelayWake) -> Arc<EventResource> {
    Arc::new(EventResource::open(dir.path().join("events.redb"), config, wake).await.expect("open"))
}

async fn settle(resource: &EventResource) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while resource.waiting().await.expect("waiting") > 0 {
        assert!(tokio::time::Instant::now() < give_up, "the outbox did not drain within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Why `relay` does not publish, once it has said (within 20 s).
async fn last_error(relay: &Relay) -> String {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(why) = relay.stats().last_error.lock().clone() {
            return why;
        }
        assert!(tokio::time::Instant::now() < give_up, "the relay never said why it does not publish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_committed_branch_publishes_each_event_once_and_an_aborted_one_none() {
    let Some(stream) = Stream::new("a_committed_branch_publishes_each_event_once_and_an_aborted_one_none").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let wake = RelayWake::new();
    let events = resource(&dir, limits(), wake.clone()).await;
    let relay = Relay::spawn(Arc::clone(&events), wake, stream.relay_config(&stream.nats.url)).expect("relay");
    let (committed, aborted) = (TxnId::new(), TxnId::new());
    assert_eq!(events.prepare(committed, stream.events(committed, 2)).await.expect("prepare"), Vote::Yes);
    assert_eq!(events.prepare(aborted, stream.events(aborted, 1)).await.expect("prepare"), Vote::Yes);
    events.abort(aborted).await.expect("abort");
    events.commit(committed).await.expect("commit");
    events.commit(committed).await.expect("a repeated commit");
    settle(&events).await;
    let ids = stream.ids(2).await;
    assert_eq!(ids, vec![format!("{committed}:events:0"), format!("{committed}:events:1")]);
    assert_eq!(relay.stats().published.load(Ordering::Relaxed), 2);
    assert_eq!(relay.stats().duplicates.load(Ordering::Relaxed), 0, "nothing published twice");
    stream.nats.delete_stream(&stream.name).await;
}

// The relay lets events gather for `linger_ms` after a wake, so the broker
// takes one batch for several store commits rather than one per commit.
#[tokio::test]
async fn events_committed_while_the_relay_lingers_go_out_in_one_batch() {
    let Some(stream) = Stream::new("events_committed_while_the_relay_lingers_go_out_in_one_batch").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let wake = RelayWake::new();
    let events = resource(&dir, limits(), wake.clone()).await;
    let config = RelayConfig { linger_ms: 1_000, ..stream.relay_config(&stream.nats.url) };
    let relay = Relay::spawn(Arc::clone(&events), wake, config).expect("relay");
    let commit = |txn: TxnId| {
        let (events, staged) = (Arc::clone(&events), stream.events(txn, 1));
        async move {
            assert_eq!(events.prepare(txn, staged).await.expect("prepare"), Vote::Yes);
            events.commit(txn).await.expect("commit");
        }
    };
    // One event out first, so the relay is connected; it now lingers after
    // that batch, then waits for a wake.
    commit(TxnId::new()).await;
    settle(&events).await;
    assert_eq!(relay.stats().batches.load(Ordering::Relaxed), 1);
    // Five commits one after another, each waking the relay: ten fsyncs,
    // well within the second it lingers. Without the linger, five batches.
    for _ in 0..5 {
        commit(TxnId::new()).await;
    }
    settle(&events).await;
    assert_eq!(stream.ids(6).await.len(), 6);
    assert_eq!(relay.stats().published.load(Ordering::Relaxed), 6);
    assert_eq!(relay.stats().batches.load(Ordering::Relaxed), 2, "five commits, one batch");
    stream.nats.delete_stream(&stream.name).await;
}

// A full batch has more behind it: the relay reads the next at once rather
// than linger, so a backlog drains at full speed. Five events, batches of
// two and a linger of a second: three batches, one linger (before the
// first); lingering before each would take three seconds.
#[tokio::test]
async fn after_a_full_batch_the_relay_reads_the_next_at_once() {
    let Some(stream) = Stream::new("after_a_full_batch_the_relay_reads_the_next_at_once").await else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let wake = RelayWake::new();
    let events = resource(&dir, limits(), wake.clone()).await;
    for _ in 0..5 {
        let txn = TxnId::new();
        assert_eq!(events.prepare(txn, stream.events(txn, 1)).await.expect("prepare"), Vote::Yes);
        events.commit(txn).await.expect("commit");
    }
    let config = RelayConfig { linger_ms: 1_000, batch_max: 2, ..stream.relay_config(&stream.nats.url) };
    let relay = Relay::spawn(Arc::clone(&events), wake, config).expect("relay");
    // Timed from the connection on: connecting and creating the stream are
    // not what is measured.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while !relay.stats().healthy.load(Ordering::Relaxed) {
        assert!(tokio::time::Instant::now() < give_up, "the relay did not connect within 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = tokio::time::Instant::now();
    settle(&events).await;
    let took = started.elapsed();
    assert_eq!(relay.stats().batches.load(Ordering::Relaxed), 3);
    assert!(took < Duration::from_millis(2_500), "five events in batches of two took {took:?}: a linger per batch");
    stream.nats.delete_stream(&stream.name).await;
}

#[tokio::test]
async fn events_committed_while_the_relay_was_down_go_out_once_after_a_restart() {
    let Some(stream) = Stream::new("events_committed_while_the_relay_was_down_go_out_once_after_a_restart").await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let txns: Vec<TxnId> = (0..5).map(|_| TxnId::new()).collect();
    {
        // No relay: committed, not published, then the process goes away.
        let events = resource(&dir, limits(), RelayWake::new()).await;
        for txn in &txns {
            assert_eq!(events.prepare(*txn, stream.events(*txn, 1)).await.expect("prepare"), Vote::Yes);
            events.commit(*txn).await.expect("commit");
        }
        assert_eq!(events.waiting().await.expect("waiting"), 5);
    }
    let wake = RelayWake::new();
    let events = resource(&dir, limits(), wake.clone()).await;
    let _relay = Relay::spawn(Arc::clone(&events), wake, stream.relay_config(&stream.nats.url)).expect("relay");
    settle(&events).await;
    let ids = stream.ids(5).await;
    let expected: Vec<String> = txns.iter().map(|t| format!("{t}:events:0")).collect();
    assert_eq!(ids, expected);
    stream.nats.delete_stream(&stream.name).await;
}

#[tokio::test]
async fn nats_away_delays_events_and_past_the_bound_prepare_votes_no() {
    let Some(stream) = Stream::new("nats_away_delays_events_and_past_the_bound_prepare_votes_no").await else {
        return;
    };
    let proxy = NatsProxy::start(&stream.nats.url).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wake = RelayWake::new();
    let config = EventResourceConfig { outbox_max: 10, ..limits() };
    let events = resource(&dir, config, wake.clone()).await;
    let relay = Relay::spawn(Arc::clone(&events), wake, stream.relay_config(&proxy.url)).expect("relay");
    // One event through while the server is there, so the stream exists.
    let first = TxnId::new();
    events.prepare(first, stream.events(first, 1)).await.expect("prepare");
    events.commit(first).await.expect("commit");
    settle(&events).await;

    proxy.cut();
    let mut committed = vec![first];
    let mut refused = None;
    for _ in 0..15 {
        let txn = TxnId::new();
        match events.prepare(txn, stream.events(txn, 1)).await.expect("prepare") {
            Vote::Yes => {
                events.commit(txn).await.expect("commit");
                committed.push(txn);
            }
            Vote::No { reason } => {
                refused = Some(reason);
                break;
            }
        }
    }
    let reason = refused.expect("past outbox_max a Prepare votes NO");
    assert!(reason.contains("event outbox full") && reason.contains("outbox_max 10"), "{reason}");
    assert_eq!(committed.len(), 11, "10 entries wait, then the bound");
    // The server stays away until the relay has failed at least once.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    while relay.stats().failures.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < give_up, "the relay never noticed the server was gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.waiting().await.expect("waiting"), 10, "the events wait");

    proxy.restore();
    settle(&events).await;
    let ids = stream.ids(11).await;
    let expected: Vec<String> = committed.iter().map(|t| format!("{t}:events:0")).collect();
    assert_eq!(ids, expected, "every event once, in commit order");
    // Room again: a new branch is taken.
    let after = TxnId::new();
    assert_eq!(events.prepare(after, stream.events(after, 1)).await.expect("prepare"), Vote::Yes);
    stream.nats.delete_stream(&stream.name).await;
}

#[tokio::test]
async fn a_stream_that_does_not_take_the_subjects_is_named_and_events_wait() {
    let Some(stream) = Stream::new("a_stream_that_does_not_take_the_subjects_is_named_and_events_wait").await else {
        return;
    };
    // An operator's stream under the same name, for other subjects.
    let other = async_nats::jetstream::stream::Config {
        name: stream.name.clone(),
        subjects: vec![format!("{}_other.>", stream.prefix)],
        ..Default::default()
    };
    stream.nats.jetstream.create_stream(other).await.expect("create the operator's stream");
    let dir = tempfile::tempdir().expect("tempdir");
    let wake = RelayWake::new();
    let events = resource(&dir, limits(), wake.clone()).await;
    let relay = Relay::spawn(Arc::clone(&events), wake, stream.relay_config(&stream.nats.url)).expect("relay");
    let txn = TxnId::new();
    events.prepare(txn, stream.events(txn, 1)).await.expect("prepare");
    events.commit(txn).await.expect("commit");
    let why = last_error(&relay).await;
    assert!(why.contains("do not take"), "{why}");
    assert_eq!(events.waiting().await.expect("waiting"), 1, "the event waits");
    stream.nats.delete_stream(&stream.name).await;
}

/// An event participant with one committed event waiting, on a stream and
/// subject prefix of its own, for a server of a test's own.
struct OneCommittedEvent {
    _store: tempfile::TempDir,
    events: Arc<EventResource>,
    wake: RelayWake,
    stream: String,
    prefix: String,
}

impl OneCommittedEvent {
    async fn new(tag: &str) -> Self {
        let (stream, prefix) = (nats_testing::unique_name(&tag.to_uppercase()), nats_testing::unique_name(tag));
        let store = tempfile::tempdir().expect("tempdir");
        let wake = RelayWake::new();
        let events = resource(&store, limits(), wake.clone()).await;
        let one = Self { _store: store, events, wake, stream, prefix };
        one.commit_another().await;
        one
    }

    /// Commits one more event.
    async fn commit_another(&self) {
        let txn = TxnId::new();
        let event = OutboxEvent::new(format!("{}.acct", self.prefix), Bytes::from("x")).expect("subject");
        assert_eq!(self.events.prepare(txn, encode_staged(&[event])).await.expect("prepare"), Vote::Yes);
        self.events.commit(txn).await.expect("commit");
    }

    /// A relay of this stream, connecting with `nats`, retrying quickly.
    fn config(&self, nats: NatsConnect) -> RelayConfig {
        RelayConfig {
            nats,
            stream: self.stream.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            retry_max_ms: 200,
            poll_interval_ms: 100,
            ack_timeout_ms: 1_000,
            ..RelayConfig::new("unused")
        }
    }
}

/// Why connecting with `nats` fails (it must).
async fn refused(nats: &NatsConnect) -> String {
    let attempt = nats
        .options("outbox-test")
        .expect("options")
        .connection_timeout(Duration::from_secs(3))
        .connect(nats.url.as_str())
        .await;
    match attempt {
        Ok(_) => panic!("connected with {nats:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_server_that_requires_tls_a_client_certificate_and_a_token_gets_events_only_with_all_three() {
    const TEST: &str = "a_server_that_requires_tls_a_client_certificate_and_a_token_gets_events_only_with_all_three";
    let dir = tempfile::tempdir().expect("tempdir");
    let (server_files, client_cert) = ServerTlsFiles::write_with_client(dir.path());
    let Some(server) = SecureNats::start(TEST, dir.path(), &server_files, ServerAuth::Token("s3cret")).await else {
        return;
    };
    let full = NatsConnect {
        url: server.url.clone(),
        ca_file: Some(server_files.ca.clone()),
        client_cert: Some(client_cert.clone()),
        auth: NatsAuth::Token("s3cret".into()),
    };
    full.validate().expect("the files are there");

    // Each part missing is refused, never served in plaintext.
    let plaintext = NatsConnect { url: server.url.replace("tls://", "nats://"), ..NatsConnect::default() };
    assert!(!refused(&plaintext).await.is_empty());
    let no_client_cert = NatsConnect { client_cert: None, ..full.clone() };
    assert!(!refused(&no_client_cert).await.is_empty());
    let wrong_token = NatsConnect { auth: NatsAuth::Token("guess".into()), ..full.clone() };
    let why = refused(&wrong_token).await;
    assert!(why.to_lowercase().contains("authorization"), "{why}");

    // A relay without the client certificate says why its events wait.
    let one = OneCommittedEvent::new("tls").await;
    let (events, wake) = (&one.events, &one.wake);
    let relay = Relay::spawn(Arc::clone(events), wake.clone(), one.config(no_client_cert)).expect("relay");
    let why = last_error(&relay).await;
    assert!(why.contains("connecting to NATS at tls://localhost"), "{why}");
    assert_eq!(events.waiting().await.expect("waiting"), 1, "the event waits");
    drop(relay);

    // With all three, it goes out once.
    let relay = Relay::spawn(Arc::clone(events), wake.clone(), one.config(full.clone())).expect("relay");
    settle(events).await;
    assert_eq!(relay.stats().published.load(Ordering::Relaxed), 1);
    let client =
        full.options("outbox-test").expect("options").connect(full.url.as_str()).await.expect("connect with all three");
    let mut stream = async_nats::jetstream::new(client).get_stream(&one.stream).await.expect("the relay's stream");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 1);
}

// An NKey user: the seed comes from a file, is checked at start-up (a file
// that holds no user seed is named, its content never shown), signs the
// server's challenge, and only the right one gets events through.
#[tokio::test]
async fn a_server_that_requires_an_nkey_gets_events_only_with_its_seed() {
    const TEST: &str = "a_server_that_requires_an_nkey_gets_events_only_with_its_seed";
    let dir = tempfile::tempdir().expect("tempdir");
    let (server_files, client_cert) = ServerTlsFiles::write_with_client(dir.path());
    let user = nkeys::KeyPair::new_user();
    let Some(server) =
        SecureNats::start(TEST, dir.path(), &server_files, ServerAuth::NkeyUser(&user.public_key())).await
    else {
        return;
    };
    let seed_file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write the seed file");
        path
    };
    let with = |auth: NatsAuth| NatsConnect {
        url: server.url.clone(),
        ca_file: Some(server_files.ca.clone()),
        client_cert: Some(client_cert.clone()),
        auth,
    };
    let right = with(NatsAuth::NkeySeedFile(seed_file("user.nk", &format!("{}\n", user.seed().expect("seed")))));
    right.validate().expect("a user seed");

    let not_a_seed = with(NatsAuth::NkeySeedFile(seed_file("token.nk", "s3cret-not-a-seed")));
    let why = not_a_seed.validate().expect_err("not a seed");
    assert!(why.contains("token.nk") && why.contains("does not hold a user seed") && !why.contains("s3cret"), "{why}");
    let missing = with(NatsAuth::NkeySeedFile(dir.path().join("missing.nk")));
    assert!(missing.validate().is_err_and(|why| why.contains("missing.nk")));
    let other = nkeys::KeyPair::new_user().seed().expect("seed");
    let wrong = with(NatsAuth::NkeySeedFile(seed_file("other.nk", &other)));
    let why = refused(&wrong).await;
    assert!(why.to_lowercase().contains("authorization"), "{why}");
    assert!(!refused(&with(NatsAuth::None)).await.is_empty(), "no credentials, refused");

    let one = OneCommittedEvent::new("nkey").await;
    let relay = Relay::spawn(Arc::clone(&one.events), one.wake.clone(), one.config(right)).expect("relay");
    settle(&one.events).await;
    assert_eq!(relay.stats().published.load(Ordering::Relaxed), 1);

    // The seed rotated: the file first, then the server, which drops the
    // connection signed by the old one. The relay's reconnection reads the
    // file again, so the next event goes out without a restart.
    let rotated = nkeys::KeyPair::new_user();
    seed_file("user.nk", &rotated.seed().expect("seed"));
    server.reload(ServerAuth::NkeyUser(&rotated.public_key())).await;
    one.commit_another().await;
    settle(&one.events).await;
    // Published once, or once more if the old connection closed before its
    // PubAck arrived (the stream then drops the repeat).
    let stats = relay.stats();
    assert_eq!(stats.published.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed), 2);
}

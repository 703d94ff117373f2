//! [`Relay`]: publishes a store's ready events to NATS JetStream, exactly
//! once per event id, and removes each only after the stream acknowledged it.
//!
//! One task per store. It connects in the background (a NATS server that is
//! down at start-up, or goes away later, only delays events), makes sure the
//! stream exists, then loops: read up to `batch_max` ready events oldest
//! first, publish them all with their ids as `Nats-Msg-Id`, wait for every
//! PubAck (at most `ack_timeout_ms`), remove the acknowledged ones, and go
//! again: at once after a full batch, otherwise after letting events gather
//! for `linger_ms`, so the broker gets few large batches rather than one per
//! store commit. When nothing is ready it waits for a [`RelayWake`] (the
//! store wakes it after each commit that readied events) or
//! `poll_interval_ms`. Failures back off from `retry_min_ms`, doubling to
//! `retry_max_ms` (the library's jittered backoff); nothing is dropped. The store bounds what waits
//! (`outbox_max`), which is the backpressure: a store past its bound votes
//! NO rather than stage more.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{NatsConnect, ReadyEvent};
use crate::cluster::Backoff;
use crate::resource::ResourceError;

/// Where a [`Relay`] reads ready events and records published ones: the
/// store that holds the outbox tables.
pub trait OutboxSource: Send + Sync + 'static {
    /// Up to `max` ready events, oldest first.
    ///
    /// # Errors
    /// When the store cannot be read; the relay retries after a pause.
    fn ready(&self, max: usize) -> impl Future<Output = Result<Vec<ReadyEvent>, ResourceError>> + Send;

    /// Removes the events numbered `seqs`, which the stream has acknowledged.
    ///
    /// # Errors
    /// When the store cannot be written; the relay publishes them again (the
    /// stream drops the repeats) and retries.
    fn published(&self, seqs: Vec<u64>) -> impl Future<Output = Result<(), ResourceError>> + Send;

    /// How many entries wait: events not yet acknowledged by the stream
    /// (and, where the store can count them, branches with staged events).
    /// Read about once a second for [`RelayStats::waiting`].
    ///
    /// # Errors
    /// When the store cannot be read.
    fn waiting(&self) -> impl Future<Output = Result<u64, ResourceError>> + Send;
}

/// Wakes a relay when events become ready, so they go out at once rather
/// than at the next poll. Cheap to clone; waking a relay that is busy makes
/// it look again when it is done.
#[derive(Debug, Clone, Default)]
pub struct RelayWake(Arc<Notify>);

impl RelayWake {
    /// A wake that no relay listens to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells the relay that events are ready.
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// Where and how a [`Relay`] publishes. Every limit has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The NATS server and how to connect to it (TLS, credentials).
    pub nats: NatsConnect,
    /// The JetStream stream, created if missing (default `TWOPC`).
    pub stream: String,
    /// The stream's subjects when the relay creates it (default `twopc.>`);
    /// every event's subject must match one.
    pub subjects: Vec<String>,
    /// The stream's de-duplication window when the relay creates it
    /// (default 120 000 ms, JetStream's own default): a republish of an id
    /// within it is dropped.
    pub duplicate_window_ms: u64,
    /// How long the stream keeps a message when the relay creates it
    /// (default 7 days); older messages are discarded, so the stream stays
    /// bounded. Consumers must read within it.
    pub stream_max_age_ms: u64,
    /// The most events published before waiting for their PubAcks (default 256).
    pub batch_max: usize,
    /// How long to wait for a batch's PubAcks (default 5 000 ms).
    pub ack_timeout_ms: u64,
    /// How often to look for ready events without a wake (default 1 000 ms).
    pub poll_interval_ms: u64,
    /// How long to let events gather before reading a batch that is not
    /// known to be full (default 10 ms, at most 1 000; 0 reads at once).
    /// Each event waits at most this much longer; in exchange the broker
    /// takes a few large batches instead of one small one per store commit,
    /// which measured 40 against 30 µs of nats-server CPU per transfer
    /// (docs/BENCHMARKS.md, "Events to NATS JetStream beside none").
    pub linger_ms: u64,
    /// The first pause after a failure (default 100 ms), doubling ...
    pub retry_min_ms: u64,
    /// ... up to this (default 5 000 ms).
    pub retry_max_ms: u64,
}

impl RelayConfig {
    /// The defaults, publishing to the server at `nats_url` in plaintext.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats: NatsConnect::new(nats_url),
            stream: "TWOPC".into(),
            subjects: vec!["twopc.>".into()],
            duplicate_window_ms: 120_000,
            stream_max_age_ms: 7 * 24 * 3_600_000,
            batch_max: 256,
            ack_timeout_ms: 5_000,
            poll_interval_ms: 1_000,
            linger_ms: 10,
            retry_min_ms: 100,
            retry_max_ms: 5_000,
        }
    }

    /// Checks every limit.
    ///
    /// # Errors
    /// A one-line reason naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.nats.validate().map_err(|e| format!("events: {e}"))?;
        let positive = [
            ("batch_max", self.batch_max as u64),
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("poll_interval_ms", self.poll_interval_ms),
            ("retry_min_ms", self.retry_min_ms),
            ("duplicate_window_ms", self.duplicate_window_ms),
            ("stream_max_age_ms", self.stream_max_age_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("events.{name} must be above 0"));
        }
        // The client allows 5 000 publishes awaiting their PubAcks.
        if self.batch_max > 4_096 {
            return Err(format!("events.batch_max is {}; at most 4096", self.batch_max));
        }
        if self.linger_ms > 1_000 {
            return Err(format!("events.linger_ms is {}; at most 1000", self.linger_ms));
        }
        if self.duplicate_window_ms > self.stream_max_age_ms {
            return Err("events.duplicate_window_ms must not exceed events.stream_max_age_ms".into());
        }
        if self.retry_max_ms < self.retry_min_ms {
            return Err("events.retry_max_ms must be at least events.retry_min_ms".into());
        }
        if self.stream.is_empty() || self.stream.contains(['.', ' ', '*', '>']) {
            return Err(format!("events.stream {:?} must be a non-empty name without . * > or spaces", self.stream));
        }
        if self.subjects.is_empty() {
            return Err("events.subjects must name at least one subject".into());
        }
        Ok(())
    }
}

/// What a relay has done since it started.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events the stream acknowledged as new.
    pub published: AtomicU64,
    /// Events the stream acknowledged as repeats (dropped by de-duplication).
    pub duplicates: AtomicU64,
    /// Batches published with at least one event acknowledged (events per
    /// batch is `(published + duplicates) / batches`; see `linger_ms`).
    pub batches: AtomicU64,
    /// Batches that failed (no connection, a timeout, the store) and were retried.
    pub failures: AtomicU64,
    /// Whether the last attempt succeeded (connected and the stream checked,
    /// a batch published); while idle, whether the client is connected.
    pub healthy: AtomicBool,
    /// The last failure, for an operator.
    pub last_error: Mutex<Option<String>>,
    /// Entries waiting in the store ([`OutboxSource::waiting`]), read
    /// every [`WAITING_REFRESH`] whether or not NATS is reachable.
    pub waiting: AtomicU64,
}

/// How often a relay reads how many entries wait.
pub const WAITING_REFRESH: Duration = Duration::from_secs(1);

/// The publishing task of one store, and the task that counts what waits;
/// both stopped when dropped.
pub struct Relay {
    stats: Arc<RelayStats>,
    task: JoinHandle<()>,
    counting: JoinHandle<()>,
}

impl Relay {
    /// Starts publishing `source`'s ready events, woken by `wake`.
    ///
    /// # Errors
    /// An invalid `config` (see [`RelayConfig::validate`]).
    pub fn spawn<S: OutboxSource>(source: Arc<S>, wake: RelayWake, config: RelayConfig) -> Result<Self, String> {
        config.validate()?;
        let stats = Arc::new(RelayStats::default());
        let counting = tokio::spawn(count_waiting(Arc::clone(&source), Arc::clone(&stats)));
        let task = tokio::spawn(run(source, wake, config, Arc::clone(&stats)));
        Ok(Self { stats, task, counting })
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.counting.abort();
    }
}

/// Keeps [`RelayStats::waiting`] current; a failed read keeps the last value.
async fn count_waiting<S: OutboxSource>(source: Arc<S>, stats: Arc<RelayStats>) {
    loop {
        match source.waiting().await {
            Ok(waiting) => stats.waiting.store(waiting, Ordering::Relaxed),
            Err(e) => debug!(error = %e, "outbox relay: cannot count waiting entries"),
        }
        tokio::time::sleep(WAITING_REFRESH).await;
    }
}

async fn run<S: OutboxSource>(source: Arc<S>, wake: RelayWake, config: RelayConfig, stats: Arc<RelayStats>) {
    let mut retry = Retry { backoff: Backoff::new(config.retry_min_ms, config.retry_max_ms), stats: &stats };
    // Connects, retrying here so that why it fails (unreachable, TLS, a
    // credential refused) reaches `last_error`; once connected, the client
    // reconnects forever. A server that is down only delays events.
    let client = loop {
        let options = match config.nats.options("twopc-outbox-relay") {
            Ok(options) => options.max_reconnects(None),
            Err(why) => {
                retry.failed(why).await;
                continue;
            }
        };
        match options.connect(config.nats.url.as_str()).await {
            Ok(client) => break client,
            Err(e) => retry.failed(format!("connecting to NATS at {}: {e}", config.nats.shown_url())).await,
        }
    };
    let mut jetstream = jetstream::new(client.clone());
    jetstream.set_timeout(Duration::from_millis(config.ack_timeout_ms));
    while let Err(why) = ensure_stream(&jetstream, &config).await {
        retry.failed(why).await;
    }
    retry.succeeded();
    info!(stream = %config.stream, url = %config.nats.shown_url(), "outbox relay: publishing");
    let linger = Duration::from_millis(config.linger_ms);
    // After a full batch more are ready already: read at once.
    let mut more_ready = false;
    loop {
        if !more_ready && !linger.is_zero() {
            tokio::time::sleep(linger).await;
        }
        let batch = match source.ready(config.batch_max).await {
            Ok(batch) => batch,
            Err(e) => {
                retry.failed(format!("reading ready events: {e}")).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = wake.0.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(config.poll_interval_ms)) => {}
            }
            // Idle, the relay learns of a lost server only from its client.
            let connected = client.connection_state() == async_nats::connection::State::Connected;
            stats.healthy.store(connected, Ordering::Relaxed);
            more_ready = false;
            continue;
        }
        more_ready = batch.len() >= config.batch_max;
        let (acked, failure) = publish(&jetstream, batch, &config, &stats).await;
        if !acked.is_empty()
            && let Err(e) = source.published(acked).await
        {
            retry.failed(format!("recording published events: {e}")).await;
            continue;
        }
        match failure {
            Some(why) => retry.failed(why).await,
            // Look again: at once after a full batch (more may be behind
            // it), after the linger otherwise; an empty read waits for the
            // next wake.
            None => retry.succeeded(),
        }
    }
}

/// Creates the stream if it is missing, and checks that one already there
/// (which keeps its own config) takes every subject this relay publishes to:
/// otherwise each event would be refused, so events wait and the operator is
/// told why.
async fn ensure_stream(jetstream: &jetstream::Context, config: &RelayConfig) -> Result<(), String> {
    let wanted = jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: config.subjects.clone(),
        duplicate_window: Duration::from_millis(config.duplicate_window_ms),
        max_age: Duration::from_millis(config.stream_max_age_ms),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let (stream, url) = (&config.stream, config.nats.shown_url());
    let mut found =
        jetstream.get_or_create_stream(wanted).await.map_err(|e| format!("creating stream {stream} at {url}: {e}"))?;
    let info = found.info().await.map_err(|e| format!("reading stream {stream} at {url}: {e}"))?;
    if let Some(subject) = uncovered(&config.subjects, &info.config.subjects) {
        return Err(format!(
            "stream {stream} exists with subjects {:?}, which do not take {subject}; events wait until the \
             stream's subjects or the bank's --events-prefix / --events-stream are fixed",
            info.config.subjects
        ));
    }
    if info.config.duplicate_window != Duration::from_millis(config.duplicate_window_ms) {
        warn!(
            stream = %stream,
            window_ms = info.config.duplicate_window.as_millis(),
            configured_ms = config.duplicate_window_ms,
            "outbox relay: the existing stream's de-duplication window differs; it applies"
        );
    }
    Ok(())
}

/// The first of `wanted` that none of the stream's `subjects` takes, if any
/// (a stream subject takes a wanted one when they are equal, or when it ends
/// in `>` and the wanted one starts with what precedes it).
fn uncovered<'a>(wanted: &'a [String], subjects: &[String]) -> Option<&'a str> {
    let takes = |have: &str, want: &str| {
        have == want || have == ">" || have.strip_suffix('>').is_some_and(|prefix| want.starts_with(prefix))
    };
    wanted.iter().map(String::as_str).find(|want| !subjects.iter().any(|have| takes(have, want)))
}

/// Publishes `batch` and waits for the PubAcks; returns the acknowledged
/// events' numbers and, if any was not acknowledged, why.
async fn publish(
    jetstream: &jetstream::Context,
    batch: Vec<ReadyEvent>,
    config: &RelayConfig,
    stats: &RelayStats,
) -> (Vec<u64>, Option<String>) {
    let deadline = Duration::from_millis(config.ack_timeout_ms);
    let mut pending = Vec::with_capacity(batch.len());
    let mut failure = None;
    for event in batch {
        let message = PublishMessage::build().payload(event.payload).message_id(&event.id);
        // One event the client refuses does not hold back the rest of the
        // batch; it stays ready and is retried, and the failure is reported.
        match tokio::time::timeout(deadline, jetstream.send_publish(event.subject, message)).await {
            Ok(Ok(ack)) => pending.push((event.seq, ack)),
            Ok(Err(e)) => failure = failure.or(Some(format!("publishing event {}: {e}", event.id))),
            Err(_) => {
                failure = Some(format!("publishing event {}: no room to send within {deadline:?}", event.id));
                break;
            }
        }
    }
    let acks = futures::future::join_all(
        pending
            .into_iter()
            .map(|(seq, ack)| async move { (seq, tokio::time::timeout(deadline, ack.into_future()).await) }),
    )
    .await;
    let mut acked = Vec::with_capacity(acks.len());
    for (seq, ack) in acks {
        match ack {
            Ok(Ok(ack)) => {
                let counter = if ack.duplicate { &stats.duplicates } else { &stats.published };
                counter.fetch_add(1, Ordering::Relaxed);
                acked.push(seq);
            }
            Ok(Err(e)) => failure = failure.or(Some(format!("the stream did not acknowledge an event: {e}"))),
            Err(_) => failure = failure.or(Some(format!("no PubAck within {deadline:?}"))),
        }
    }
    if !acked.is_empty() {
        stats.batches.fetch_add(1, Ordering::Relaxed);
    }
    debug!(acked = acked.len(), failed = failure.is_some(), "outbox relay: batch published");
    (acked, failure)
}

/// What the relay does after a failure (counts it, keeps the reason for an
/// operator, logs it, pauses with the library's backoff) and after a success.
struct Retry<'a> {
    backoff: Backoff,
    stats: &'a RelayStats,
}

impl Retry<'_> {
    async fn failed(&mut self, why: String) {
        let pause = self.backoff.next();
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.stats.healthy.store(false, Ordering::Relaxed);
        warn!(error = %why, retry_in_ms = pause.as_millis(), "outbox relay: events wait");
        *self.stats.last_error.lock() = Some(why);
        tokio::time::sleep(pause).await;
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
        self.stats.healthy.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A stream that does not take the relay's subjects is named, not used.
    #[test]
    fn a_stream_must_take_every_subject_published_to() {
        let wanted = vec!["twopc.>".to_owned()];
        assert_eq!(uncovered(&wanted, &["twopc.>".to_owned()]), None);
        assert_eq!(uncovered(&wanted, &[">".to_owned()]), None);
        assert_eq!(uncovered(&wanted, &["acme.>".to_owned()]), Some("twopc.>"));
        assert_eq!(uncovered(&["twopc.a.>".to_owned()], &["twopc.>".to_owned()]), None);
        assert_eq!(uncovered(&wanted, &["twopc.a.>".to_owned()]), Some("twopc.>"));
    }

    // A linger past a second would hold every event back that long.
    #[test]
    fn linger_is_bounded() {
        let config = |linger_ms| RelayConfig { linger_ms, ..RelayConfig::new("nats://127.0.0.1:4222") };
        assert_eq!(config(0).validate(), Ok(()));
        assert_eq!(config(1_000).validate(), Ok(()));
        assert!(config(1_001).validate().is_err_and(|e| e.contains("events.linger_ms")));
    }
}

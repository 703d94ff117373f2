//! [`sync()`]: reads the stream with a durable pull consumer, applies each
//! fetched batch through [`ViewStore::apply`], and acknowledges only after it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt as _;
use tracing::warn;
use twopc_participant::outbox::NatsConnect;

use super::store::{Delivered, ViewStore};

/// The largest `batch_max`.
pub const BATCH_MAX_LIMIT: usize = 10_000;
/// The default `applied_ids_max`: some 200 MB of ids (two keys of about 60
/// bytes each per event) in the view's file.
pub const APPLIED_IDS_MAX_DEFAULT: u64 = 1_000_000;
/// How long one pull waits for the next message before asking again.
const PULL_WAIT: Duration = Duration::from_secs(1);
/// The longest pause between attempts to reach NATS while following.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);
/// How often a long sync prints a progress line.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);

/// How [`sync`] reads the stream.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The view's directory; its store is `DIR/view.redb`.
    pub data_dir: PathBuf,
    /// The NATS server and how to connect to it. Default:
    /// `nats://127.0.0.1:4222`, plaintext, no credentials.
    pub nats: NatsConnect,
    /// The JetStream stream the banks publish to. Default: `TWOPC`.
    pub stream: String,
    /// The durable consumer's name; one per view store. Default: `twopc-view`.
    pub consumer: String,
    /// The most messages fetched and applied at once. Default: 256.
    pub batch_max: usize,
    /// How long the server waits for an ack before delivering a message
    /// again; must exceed the time to apply a batch. Default: 30000.
    pub ack_wait_ms: u64,
    /// The most events kept in each account's history. Default: 1000.
    pub history_max: u64,
    /// The most applied event ids remembered, newest by stream sequence
    /// kept: an event delivered again after this many newer ones is applied
    /// again. Default: [`APPLIED_IDS_MAX_DEFAULT`].
    pub applied_ids_max: u64,
    /// Print a progress line to stderr every few seconds. Default: false.
    pub progress: bool,
    /// Test hook: exit the process with code 9 once this run has applied at
    /// least this many events, after the apply and before the acks.
    /// Default: None.
    pub exit_after_applied: Option<u64>,
    /// Test hook: exit the process with code 9 once the first batch is
    /// fetched, before it is applied or acked. Default: false.
    pub exit_after_fetched: bool,
}

impl SyncConfig {
    /// The defaults, with the view in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            nats: NatsConnect::new("nats://127.0.0.1:4222"),
            stream: "TWOPC".into(),
            consumer: "twopc-view".into(),
            batch_max: 256,
            ack_wait_ms: 30_000,
            history_max: 1000,
            applied_ids_max: APPLIED_IDS_MAX_DEFAULT,
            progress: false,
            exit_after_applied: None,
            exit_after_fetched: false,
        }
    }

    /// Checks the limits.
    ///
    /// # Errors
    /// A limit is out of range, or a name is empty.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=BATCH_MAX_LIMIT).contains(&self.batch_max) {
            bail!("--batch-max must be 1 to {BATCH_MAX_LIMIT}");
        }
        if self.ack_wait_ms < 100 {
            bail!("--ack-wait-ms must be at least 100");
        }
        if self.history_max == 0 {
            bail!("--history-max must be at least 1");
        }
        if self.applied_ids_max == 0 {
            bail!("--applied-ids-max must be at least 1");
        }
        if self.stream.is_empty() || self.consumer.is_empty() {
            bail!("--stream and --consumer must not be empty");
        }
        Ok(())
    }

    /// The consumer's bound on delivered, unacknowledged messages: room for
    /// this run's batch while a crashed run's batch still waits to be
    /// delivered again.
    fn ack_pending_max(&self) -> i64 {
        i64::try_from(2 * self.batch_max).unwrap_or(i64::MAX)
    }
}

/// What one [`sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Events applied.
    pub applied: u64,
    /// Deliveries skipped because they were already applied (or recorded as malformed).
    pub duplicates: u64,
    /// Malformed messages skipped.
    pub skipped: u64,
}

/// Applies the stream's events to the view in `config.data_dir`: until
/// nothing is pending (or `shutdown` resolves), or with `follow` until
/// `shutdown` resolves.
///
/// # Errors
/// The store is in use or fails; the stream is missing; NATS is unreachable
/// (only without `follow`; with it, retried).
pub async fn sync(config: &SyncConfig, follow: bool, shutdown: impl Future<Output = ()>) -> anyhow::Result<SyncReport> {
    config.validate()?;
    let store = ViewStore::open(&config.data_dir)?;
    let mut shutdown = pin!(shutdown);
    let mut report = SyncReport::default();
    let (consumer, stream) = tokio::select! {
        () = &mut shutdown => return Ok(report),
        connected = connect(config, &store, follow) => connected?,
    };
    let mut applied_through = store.last_stream_seq()?;
    let mut progress = Progress { enabled: config.progress, last: Instant::now() };
    let mut retry = RetryDelay::default();
    loop {
        let messages = tokio::select! {
            () = &mut shutdown => break,
            messages = next_batch(&consumer, config.batch_max, follow) => messages,
        };
        let messages = match messages {
            Ok(Some(messages)) => messages,
            Ok(None) => break,
            Err(e) if follow => {
                warn!(error = %format!("{e:#}"), "view: reading the stream failed; retrying");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = retry.wait() => continue,
                }
            }
            Err(e) => return Err(e),
        };
        retry = RetryDelay::default();
        // The crash point before the apply: the server delivers these again
        // only after ack_wait, and newer messages first.
        if config.exit_after_fetched {
            std::process::exit(9);
        }
        let mut batch = Vec::with_capacity(messages.len());
        let mut pending = 0;
        for message in &messages {
            let info = message.info().map_err(|e| anyhow::anyhow!("a message without JetStream metadata: {e}"))?;
            pending = info.pending;
            let published_ms = info.published.unix_timestamp_nanos() / 1_000_000;
            batch.push(Delivered {
                stream_seq: info.stream_sequence,
                published_unix_ms: u64::try_from(published_ms).unwrap_or(0),
                payload: message.payload.clone(),
            });
        }
        // A batch that starts past the next sequence: those messages were
        // delivered to a run that died before applying them (the server
        // sends them again after ack_wait), or they aged out while this
        // follower was cut off. The stream's oldest message tells which.
        let first = batch.iter().map(|d| d.stream_seq).min().unwrap_or(applied_through);
        if first > applied_through.saturating_add(1) {
            let details = stream.info_builder().with_deleted(true).fetch().await;
            let state = details.context("reading the stream's state")?.info.state;
            check_no_gap(&config.stream, applied_through, state.first_sequence)?;
            check_none_deleted(&config.stream, applied_through, first, state.deleted.as_deref().unwrap_or_default())?;
        }
        applied_through = batch.iter().map(|d| d.stream_seq).fold(applied_through, u64::max);
        let applier = store.clone();
        let (history_max, applied_ids_max) = (config.history_max, config.applied_ids_max);
        let outcome = twopc_proto::host::run_blocking(move || applier.apply(&batch, history_max, applied_ids_max))
            .await
            .context("the view's apply task failed")??;
        report.applied += outcome.applied;
        report.duplicates += outcome.duplicates;
        report.skipped += outcome.skipped;
        // The crash point the tests use: applied durably, not yet acked, so
        // the next run gets this batch again and must skip all of it.
        if config.exit_after_applied.is_some_and(|n| report.applied >= n) {
            std::process::exit(9);
        }
        // Only now, with the batch durable, ack it (docs/PROTOCOL.md §14). A
        // failed ack only means the message comes again and is skipped.
        let acks = futures::future::join_all(messages.iter().map(|m| m.double_ack())).await;
        if let Some(Err(e)) = acks.into_iter().find(Result::is_err) {
            warn!(error = %e, "view: an ack failed; the message will be delivered again and skipped");
        }
        progress.tick(&report, pending);
    }
    Ok(report)
}

/// Why [`try_connect`] failed: an outage, retried while following, or not.
enum ConnectError {
    Unreachable(anyhow::Error),
    Fatal(anyhow::Error),
}

/// Connects to NATS and opens the durable consumer; while following,
/// retries until NATS answers.
async fn connect(
    config: &SyncConfig,
    store: &ViewStore,
    follow: bool,
) -> anyhow::Result<(PullConsumer, jetstream::stream::Stream)> {
    let mut retry = RetryDelay::default();
    loop {
        match try_connect(config, store).await {
            Ok(connected) => return Ok(connected),
            Err(ConnectError::Unreachable(e)) if follow => {
                warn!(error = %format!("{e:#}"), "view: NATS is unreachable; retrying");
                retry.wait().await;
            }
            Err(ConnectError::Unreachable(e) | ConnectError::Fatal(e)) => return Err(e),
        }
    }
}

fn unreachable(what: String, e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Unreachable(anyhow::anyhow!("{what}: {e}"))
}

async fn try_connect(
    config: &SyncConfig,
    store: &ViewStore,
) -> Result<(PullConsumer, jetstream::stream::Stream), ConnectError> {
    let url = &config.nats.shown_url();
    let options = config.nats.options("twopc-view").map_err(|why| ConnectError::Fatal(anyhow::anyhow!(why)))?;
    let client = options
        .connection_timeout(Duration::from_secs(3))
        .connect(config.nats.url.as_str())
        .await
        .map_err(|e| unreachable(format!("cannot reach NATS at {url} (--nats / TWOPC_NATS_URL)"), e))?;
    let jetstream = jetstream::new(client);
    let mut stream = match jetstream.get_stream(&config.stream).await {
        Ok(stream) => stream,
        Err(e) => {
            if let jetstream::context::GetStreamErrorKind::JetStream(js) = e.kind()
                && js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            {
                // Not retried, even when following: a setting, not an outage.
                return Err(ConnectError::Fatal(anyhow::anyhow!(
                    "there is no stream {0} at {url}; banks started with events on create it \
                     (`twopc bank --events-nats {url} --events-stream {0} ...`), or give --stream",
                    config.stream
                )));
            }
            return Err(unreachable(format!("cannot read stream {} at {url}", config.stream), e));
        }
    };
    // Bound only to a stream that exists, so a mistyped --stream is not
    // remembered; a view of another stream is that error, not a gap.
    store.bind(&config.stream).map_err(ConnectError::Fatal)?;
    let applied_through = store.last_stream_seq().map_err(ConnectError::Fatal)?;
    let info = stream.info().await.map_err(|e| unreachable(format!("cannot read stream {}", config.stream), e))?;
    check_incarnation(store, &config.stream, info, applied_through).map_err(ConnectError::Fatal)?;
    check_no_gap(&config.stream, applied_through, info.state.first_sequence).map_err(ConnectError::Fatal)?;
    // The consumer acks only what the store holds, so one that has acked
    // past the store's last sequence belongs to a store since deleted or
    // restored: replay the stream from the start; the ids make that safe.
    match stream.consumer_info(&config.consumer).await {
        Ok(info) if info.ack_floor.stream_sequence > applied_through => {
            warn!(
                consumer = %config.consumer,
                acked_through = info.ack_floor.stream_sequence,
                applied_through,
                "view: the consumer is ahead of this store; replaying the stream from the start"
            );
            stream
                .delete_consumer(&config.consumer)
                .await
                .map_err(|e| unreachable(format!("cannot delete consumer {}", config.consumer), e))?;
        }
        Ok(_) => {}
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {}
        Err(e) => return Err(unreachable(format!("cannot read consumer {}", config.consumer), e)),
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(config.consumer.clone()),
            description: Some("twopc view: a materialized view of the bank events".into()),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            max_ack_pending: config.ack_pending_max(),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            unreachable(format!("cannot create consumer {} on stream {}", config.consumer, config.stream), e)
        })?;
    Ok((consumer, stream))
}

/// Refuses a stream whose sequences went back below what this view applied
/// (deleted and created again: the events the view applied are not in it).
/// A stream whose creation time changed without that is only warned about:
/// nats-server has been seen to report a new creation time after a config
/// update across a restart, and refusing would strand a sound view.
fn check_incarnation(
    store: &ViewStore,
    stream: &str,
    info: &jetstream::stream::Info,
    applied_through: u64,
) -> anyhow::Result<()> {
    if info.state.last_sequence < applied_through {
        bail!(
            "stream {stream} ends at message {} but this view applied up to {applied_through}: it was deleted and \
             created again, and the events this view applied are not in it; build a new view (another --data and \
             --consumer)",
            info.state.last_sequence
        );
    }
    if store.record_stream_created(info.created.unix_timestamp_nanos())? {
        warn!(
            stream,
            "view: the stream's creation time changed since this view last read it: if it was deleted and created \
             again, this view's balances are wrong and a new view must be built"
        );
    }
    Ok(())
}

/// Refuses to go on when the stream no longer holds messages this view
/// never applied: messages older than the stream's max_age (7 days in the
/// streams banks create) are discarded, and a view that missed them would
/// show balances the banks never had, with nothing to say so.
fn check_no_gap(stream: &str, applied_through: u64, first_sequence: u64) -> anyhow::Result<()> {
    if first_sequence <= applied_through.saturating_add(1) {
        return Ok(());
    }
    bail!(
        "stream {stream} no longer holds messages {} to {} (past its max_age, or deleted), which this view never \
         applied: it would miss their events. Sync a view more often than the stream's max_age, or raise it; a \
         view that missed events cannot be repaired from this stream",
        applied_through + 1,
        first_sequence - 1
    )
}

/// Refuses to go on when a message between the last applied and the
/// batch's first (`batch_first`) was deleted from the stream: its event
/// would be missing from the view for good.
fn check_none_deleted(stream: &str, applied_through: u64, batch_first: u64, deleted: &[u64]) -> anyhow::Result<()> {
    let lost = || deleted.iter().copied().filter(|seq| *seq > applied_through && *seq < batch_first);
    let (Some(first_lost), Some(last_lost)) = (lost().min(), lost().max()) else { return Ok(()) };
    bail!(
        "stream {stream} no longer holds messages {first_lost} to {last_lost} (deleted), which this view never \
         applied: it would miss their events. A view that missed events cannot be repaired from this stream"
    )
}

/// The next batch, waiting for one while following; None once caught up
/// (nothing pending and nothing delivered but unacknowledged) without
/// `follow`.
async fn next_batch(
    consumer: &PullConsumer,
    batch_max: usize,
    follow: bool,
) -> anyhow::Result<Option<Vec<jetstream::Message>>> {
    loop {
        let ready = collect(consumer.fetch().max_messages(batch_max).messages().await).await?;
        if !ready.is_empty() {
            return Ok(Some(ready));
        }
        if !follow {
            let info = consumer.get_info().await.context("reading the consumer's state")?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(None);
            }
        }
        // Wait for the next message (a new one, or one a crashed run left
        // unacknowledged, delivered again after ack_wait), then take what
        // is behind it.
        let mut first = collect(consumer.batch().max_messages(1).expires(PULL_WAIT).messages().await).await?;
        if first.is_empty() {
            continue;
        }
        if batch_max > 1 {
            first.extend(collect(consumer.fetch().max_messages(batch_max - 1).messages().await).await?);
        }
        return Ok(Some(first));
    }
}

async fn collect(
    batch: Result<jetstream::consumer::pull::Batch, jetstream::consumer::pull::BatchError>,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let mut batch = batch.context("pulling from the stream")?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message.map_err(|e| anyhow::anyhow!("pulling from the stream: {e}"))?);
    }
    Ok(messages)
}

/// A doubling pause between attempts, up to [`RETRY_DELAY_MAX`].
#[derive(Default)]
struct RetryDelay {
    next: Duration,
}

impl RetryDelay {
    async fn wait(&mut self) {
        let delay = self.next.max(Duration::from_millis(100));
        tokio::time::sleep(delay).await;
        self.next = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

/// A progress line every [`PROGRESS_INTERVAL`] on long syncs.
struct Progress {
    enabled: bool,
    last: Instant,
}

impl Progress {
    fn tick(&mut self, report: &SyncReport, pending: u64) {
        if !self.enabled || self.last.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "view: applied {} events ({} duplicates, {} malformed skipped), {pending} pending",
            report.applied, report.duplicates, report.skipped
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A stream that still holds the message after the last one applied (or
    // everything, for a new view) is fine; one whose oldest message is
    // further on has lost events this view never saw.
    #[test]
    fn a_stream_missing_messages_the_view_never_applied_is_refused() {
        assert!(check_no_gap("S", 0, 0).is_ok(), "an empty new stream");
        assert!(check_no_gap("S", 0, 1).is_ok(), "a new view of a whole stream");
        assert!(check_no_gap("S", 40, 41).is_ok(), "the oldest kept message is the next one");
        assert!(check_no_gap("S", 40, 12).is_ok(), "messages this view applied already aged out");
        let why = check_no_gap("S", 40, 45).expect_err("44 lost").to_string();
        assert!(why.contains("no longer holds messages 41 to 44"), "{why}");
        assert!(check_no_gap("S", 0, 3).is_err(), "a new view of a stream that lost its start");
    }

    // Messages deleted between the last applied and a batch's first are lost;
    // deleted ones elsewhere, or none, are not this view's concern.
    #[test]
    fn messages_deleted_before_a_batch_are_refused() {
        assert!(check_none_deleted("S", 10, 14, &[]).is_ok(), "11-13 only wait to be delivered again");
        assert!(check_none_deleted("S", 10, 14, &[3, 10, 14, 20]).is_ok(), "none of 11-13 deleted");
        let why = check_none_deleted("S", 10, 14, &[13, 3, 11]).expect_err("11 and 13 lost").to_string();
        assert!(why.contains("no longer holds messages 11 to 13"), "{why}");
    }
}

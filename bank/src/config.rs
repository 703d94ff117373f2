//! [`BankConfig`] and [`StoreConfig`]: where the bank keeps its data, every
//! limit of its store, and the participant library's settings, each with its
//! default.

use std::path::PathBuf;

use twopc_participant::ParticipantConfig;
use twopc_proto::ParticipantId;

use crate::error::{Error, Result};

/// The store file's name inside the data dir.
pub const STORE_FILE_NAME: &str = "bank.redb";

/// The longest allowed `finished_retention_ms`: 7 days.
pub const FINISHED_RETENTION_MAX_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// Everything a bank needs to run ([`crate::server::run`]).
#[derive(Debug, Clone)]
pub struct BankConfig {
    /// The participant library's settings; its `id` is this bank's name
    /// (such as `bank-a`) and its `coordinators` the cluster to resolve
    /// in-doubt branches with.
    ///
    /// Default: [`ParticipantConfig::new`]'s defaults.
    pub participant: ParticipantConfig,
    /// The directory holding the store file ([`STORE_FILE_NAME`]); created
    /// if missing. One bank per directory.
    ///
    /// Default: none; always given.
    pub data_dir: PathBuf,
    /// The store's limits.
    ///
    /// Default: [`StoreConfig::default`].
    pub store: StoreConfig,
    /// Events to NATS JetStream (docs/PROTOCOL.md §14), or None for none.
    ///
    /// Default: None.
    pub events: Option<crate::events::EventsConfig>,
}

impl BankConfig {
    /// A config for bank `id` resolving against `coordinators` (`host:port`
    /// each), storing in `data_dir`, with every limit at its default.
    pub fn new(id: ParticipantId, coordinators: Vec<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            participant: ParticipantConfig::new(id, coordinators),
            data_dir: data_dir.into(),
            store: StoreConfig::default(),
            events: None,
        }
    }

    /// This bank's name.
    pub fn id(&self) -> &ParticipantId {
        &self.participant.id
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(STORE_FILE_NAME)
    }

    /// Checks every field; [`crate::server::run`] calls it first.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first field at fault and why.
    pub fn validate(&self) -> Result<()> {
        self.participant.validate().map_err(|e| Error::Config(format!("participant: {e}")))?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::Config("data_dir is empty; give the directory for the bank's store file".into()));
        }
        self.store.validate()?;
        if let Some(events) = &self.events {
            events.validate()?;
        }
        // I4: the store's tombstones must outlive the library's memory of
        // them, or a restarted bank would forget an abort the library still
        // vouches for.
        if self.store.finished_retention_ms < self.participant.tombstone_retention_ms {
            return Err(Error::Config(format!(
                "store.finished_retention_ms ({}) is shorter than \
                 participant.tombstone_retention_ms ({}); tombstones must be kept at least as long",
                self.store.finished_retention_ms, self.participant.tombstone_retention_ms
            )));
        }
        Ok(())
    }
}

/// The limits of the embedded (redb) store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The most operations (prepares, decisions, account creations) waiting
    /// for the store's writer; one more gets [`Error::QueueFull`]
    /// (`UNAVAILABLE` to the coordinator, which retries; `RESOURCE_EXHAUSTED`
    /// on the Bank API). Keep it above the participant's
    /// `prepare_inflight_max`.
    ///
    /// Default: 8192.
    pub queue_max: usize,
    /// The most operations one write transaction, and so one fsync, carries
    /// (group commit): the writer takes everything queued up to this many.
    ///
    /// Default: 1024.
    pub batch_max: usize,
    /// How long finished branch records (committed, aborted, NO votes,
    /// tombstones) are kept after they finish, in milliseconds. Bounds the
    /// store's size; must outlive every deadline a Prepare could carry
    /// (docs/PROTOCOL.md section 7.1), and the participant's
    /// `tombstone_retention_ms`. At most [`FINISHED_RETENTION_MAX_MS`].
    ///
    /// Default: 600000 (10 minutes).
    pub finished_retention_ms: u64,
    /// How often the writer removes expired records, in milliseconds.
    ///
    /// Default: 1000.
    pub gc_interval_ms: u64,
    /// The most expired records removed in one pass, so one write
    /// transaction never grows large; after a full pass the next write
    /// batch collects again, so collection keeps up with any load.
    ///
    /// Default: 1024.
    pub gc_batch_max: usize,
    /// The store file's page cache in memory, in bytes. redb's own default is
    /// 1 GiB, which a bank under sustained load fills as its file grows
    /// through the retention window (docs/BENCHMARKS.md): this bounds the
    /// bank's memory instead.
    ///
    /// Default: 67108864 (64 MiB).
    pub cache_max_bytes: usize,
    /// After a write fails for an I/O reason (a full disk, a failed fsync),
    /// redb refuses every later operation until the file is reopened: the
    /// writer then closes it and reopens it, first after this many
    /// milliseconds, doubling up to `reopen_backoff_max_ms`, until a probe
    /// write succeeds (see docs/OPERATIONS.md, "A full disk"). Meanwhile
    /// every operation fails with `UNAVAILABLE` at once.
    ///
    /// Default: 100.
    pub reopen_backoff_min_ms: u64,
    /// The longest pause between two attempts to reopen the store file; so
    /// the bank is writable at most this long after the fault clears.
    ///
    /// Default: 5000.
    pub reopen_backoff_max_ms: u64,
    /// Events (docs/PROTOCOL.md §14): when set, each Prepare that votes YES
    /// stages one event per operation in its own write, each Commit readies
    /// them, each account opened enqueues one; `None` stages nothing.
    /// [`crate::server::run`] sets it from [`BankConfig::events`].
    ///
    /// Default: None.
    pub events: Option<crate::events::EventSubjects>,
    /// With events on, the most entries that may wait (branches staged plus
    /// events the stream has not acknowledged, as when NATS is down); a
    /// Prepare past it votes NO "event outbox full". A committed branch's
    /// events are never dropped.
    ///
    /// Default: 100 000.
    pub outbox_max: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            queue_max: 8192,
            batch_max: 1024,
            finished_retention_ms: 600_000,
            gc_interval_ms: 1_000,
            gc_batch_max: 1024,
            cache_max_bytes: 64 * 1024 * 1024,
            reopen_backoff_min_ms: 100,
            reopen_backoff_max_ms: 5_000,
            events: None,
            outbox_max: 100_000,
        }
    }
}

impl StoreConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first field at fault and why.
    pub fn validate(&self) -> Result<()> {
        let fail = |why: String| Err(Error::Config(why));
        let positive = [
            ("store.queue_max", self.queue_max as u64),
            ("store.batch_max", self.batch_max as u64),
            ("store.finished_retention_ms", self.finished_retention_ms),
            ("store.gc_interval_ms", self.gc_interval_ms),
            ("store.gc_batch_max", self.gc_batch_max as u64),
            ("store.cache_max_bytes", self.cache_max_bytes as u64),
            ("store.reopen_backoff_min_ms", self.reopen_backoff_min_ms),
            ("store.reopen_backoff_max_ms", self.reopen_backoff_max_ms),
            ("store.outbox_max", self.outbox_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                return fail(format!("{name} is 0; it must be at least 1"));
            }
        }
        if self.reopen_backoff_min_ms > self.reopen_backoff_max_ms {
            return fail(format!(
                "store.reopen_backoff_min_ms ({}) is greater than store.reopen_backoff_max_ms ({})",
                self.reopen_backoff_min_ms, self.reopen_backoff_max_ms
            ));
        }
        if self.finished_retention_ms > FINISHED_RETENTION_MAX_MS {
            return fail(format!(
                "store.finished_retention_ms ({}) exceeds {FINISHED_RETENTION_MAX_MS} (7 days)",
                self.finished_retention_ms
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BankConfig {
        let id = "bank-a".parse().expect("valid id");
        BankConfig::new(id, vec!["127.0.0.1:7000".into()], "/tmp/bank-a")
    }

    fn rejected_mentioning(config: &BankConfig, field: &str) -> bool {
        matches!(config.validate(), Err(Error::Config(why)) if why.contains(field))
    }

    // I6 (bounded): the defaults are a usable config.
    #[test]
    fn defaults_are_valid() {
        assert!(config().validate().is_ok());
        assert_eq!(config().store_path(), PathBuf::from("/tmp/bank-a/bank.redb"));
    }

    // I6 (bounded): a zero limit would disable a bound; each is rejected by name.
    #[test]
    fn zero_limits_are_rejected() {
        type Zero = fn(&mut StoreConfig);
        let zeroes: [(&str, Zero); 8] = [
            ("queue_max", |c| c.queue_max = 0),
            ("batch_max", |c| c.batch_max = 0),
            ("finished_retention_ms", |c| c.finished_retention_ms = 0),
            ("gc_interval_ms", |c| c.gc_interval_ms = 0),
            ("gc_batch_max", |c| c.gc_batch_max = 0),
            ("cache_max_bytes", |c| c.cache_max_bytes = 0),
            ("reopen_backoff_min_ms", |c| c.reopen_backoff_min_ms = 0),
            ("reopen_backoff_max_ms", |c| c.reopen_backoff_max_ms = 0),
        ];
        for (field, zero) in zeroes {
            let mut c = config();
            zero(&mut c.store);
            assert!(rejected_mentioning(&c, field), "{field} = 0 was accepted");
        }
    }

    // I6 (bounded retry): the reopen backoff's bounds must be ordered.
    #[test]
    fn reopen_backoff_bounds_are_ordered() {
        let mut c = config();
        c.store.reopen_backoff_min_ms = c.store.reopen_backoff_max_ms + 1;
        assert!(rejected_mentioning(&c, "reopen_backoff_min_ms"));
    }

    // I4: tombstones on disk must outlive the library's memory of them; retention is bounded (I6).
    #[test]
    fn retention_is_bounded_both_ways() {
        let mut c = config();
        c.store.finished_retention_ms = c.participant.tombstone_retention_ms - 1;
        assert!(rejected_mentioning(&c, "finished_retention_ms"));
        c.store.finished_retention_ms = FINISHED_RETENTION_MAX_MS + 1;
        assert!(rejected_mentioning(&c, "finished_retention_ms"));
        c.store.finished_retention_ms = FINISHED_RETENTION_MAX_MS;
        assert!(c.validate().is_ok());
    }

    // The participant's own settings are checked too, named under `participant`.
    #[test]
    fn participant_settings_are_checked() {
        let mut c = config();
        c.participant.coordinators.clear();
        assert!(rejected_mentioning(&c, "participant: "));
        let mut c = config();
        c.data_dir = PathBuf::new();
        assert!(rejected_mentioning(&c, "data_dir"));
    }
}

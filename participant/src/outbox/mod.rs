//! The transactional outbox (docs/PROTOCOL.md §14): events a branch stages
//! with its Prepare, in the same durable write, and publishes to NATS
//! JetStream if and only if the branch commits, exactly once.
//!
//! A store that wants its writes announced does three things, each inside a
//! write it already makes durable:
//! 1. Prepare stages the branch's events ([`OutboxTables::stage`]);
//! 2. Commit moves them to the ready queue ([`OutboxTables::commit`]) and
//!    Abort drops them ([`OutboxTables::abort`]);
//! 3. the [`Relay`] publishes what is ready, each event with its id as the
//!    JetStream `Nats-Msg-Id`, waits for each PubAck, and only then removes
//!    it ([`OutboxSource::published`]).
//!
//! A crash anywhere leaves the events staged (and the branch in doubt, which
//! the resolver settles) or ready (published on restart). A republish of an
//! event whose removal was lost is dropped by the stream's de-duplication
//! while it is within the stream's `duplicate_window`; past it (a store down
//! for longer than the window between the PubAck and the removal's fsync,
//! which is milliseconds apart) the stream holds it twice, with the same id,
//! and consumers skip it by id, as `twopc view` does.
//!
//! # Layout
//! - [`tables`]: [`OutboxTables`], the staged and ready tables inside a redb store's own write transactions.
//! - [`nats`]: [`NatsConnect`], the NATS server's URL, TLS and credentials.
//! - [`relay`]: [`Relay`] and [`OutboxSource`]: publishing what is ready, bounded and retried.
//! - [`event_resource`]: [`EventResource`], a participant whose branches only publish events.

pub mod event_resource;
pub mod nats;
pub mod relay;
pub mod tables;

use bytes::Bytes;
use twopc_proto::TxnId;

pub use event_resource::{EventResource, EventResourceConfig};
pub use nats::{NatsAuth, NatsConnect};
pub use relay::{OutboxSource, Relay, RelayConfig, RelayStats, RelayWake};
pub use tables::OutboxTables;

/// The longest subject an event may have, in bytes.
pub const SUBJECT_MAX_BYTES: usize = 256;

/// One event a branch stages: where it goes and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The NATS subject, such as `twopc.bank-a.alice`.
    pub subject: String,
    /// The message body, opaque to the outbox.
    pub payload: Bytes,
}

impl OutboxEvent {
    /// An event, its subject checked.
    ///
    /// # Errors
    /// A reason a person can read when `subject` is empty, longer than
    /// [`SUBJECT_MAX_BYTES`], has an empty token, a wildcard, or characters
    /// other than `A-Z a-z 0-9 _ -` between its dots.
    pub fn new(subject: impl Into<String>, payload: Bytes) -> Result<Self, String> {
        let subject = subject.into();
        check_subject(&subject)?;
        Ok(Self { subject, payload })
    }
}

/// Checks an event subject: dot-separated tokens of `A-Z a-z 0-9 _ -`.
///
/// # Errors
/// Why the subject cannot be published to.
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() || subject.len() > SUBJECT_MAX_BYTES {
        return Err(format!("event subject must be 1 to {SUBJECT_MAX_BYTES} bytes, got {}", subject.len()));
    }
    let token_ok = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !subject.split('.').all(token_ok) {
        return Err(format!(
            "event subject {subject:?} must be dot-separated tokens of A-Z a-z 0-9 _ - (no wildcards or spaces)"
        ));
    }
    Ok(())
}

/// The id of the `index`-th event of the branch of `txn` at participant
/// `source`: its `Nats-Msg-Id`, unique across the participants of a txn.
pub fn event_id(txn: TxnId, source: &str, index: usize) -> String {
    format!("{txn}:{source}:{index}")
}

/// An event that is ready to publish: its branch committed (or it was
/// enqueued with a write of its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyEvent {
    /// Its place in the ready queue, which [`OutboxSource::published`] takes back.
    pub seq: u64,
    /// Its id, published as `Nats-Msg-Id`.
    pub id: String,
    /// The NATS subject.
    pub subject: String,
    /// The message body.
    pub payload: Bytes,
}

/// Decodes a branch payload of `StagedEvents` (participant.proto) into events.
///
/// # Errors
/// A reason a person can read: not a `StagedEvents` message, a bad subject,
/// or more than `max_events` events.
pub fn decode_staged(payload: &[u8], max_events: usize) -> Result<Vec<OutboxEvent>, String> {
    use prost::Message as _;
    let staged = twopc_proto::pb::StagedEvents::decode(payload)
        .map_err(|e| format!("the payload is not a StagedEvents message: {e}"))?;
    if staged.events.len() > max_events {
        return Err(format!("{} events in one branch; at most {max_events}", staged.events.len()));
    }
    staged.events.into_iter().map(|e| OutboxEvent::new(e.subject, e.payload)).collect()
}

/// Encodes events as a `StagedEvents` payload (participant.proto): what a
/// client sends an [`EventResource`] as its branch.
pub fn encode_staged(events: &[OutboxEvent]) -> Bytes {
    use prost::Message as _;
    let staged = twopc_proto::pb::StagedEvents {
        events: events
            .iter()
            .map(|e| twopc_proto::pb::StagedEvent { subject: e.subject.clone(), payload: e.payload.clone() })
            .collect(),
    };
    Bytes::from(staged.encode_to_vec())
}

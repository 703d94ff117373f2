//! The bank's events (docs/PROTOCOL.md §14, `BankEvent` in bank.proto): one
//! per operation of a committed branch (`TransferDebited`,
//! `TransferCredited`) and one per account opened (`AccountOpened`), on
//! subject `<prefix>.<bank>.<account>`, published through the participant
//! library's outbox and relay.
//!
//! [`EventsConfig`] turns them on for [`crate::server::run`];
//! [`EventSubjects`] is what the store needs to build them.

use std::sync::Arc;

use prost::Message as _;
use tracing::info;
use twopc_participant::outbox::{OutboxEvent, OutboxSource, Relay, RelayConfig, RelayWake, check_subject, event_id};
use twopc_proto::pb::{self, bank_event};
use twopc_proto::{ParticipantId, TxnId};

use crate::address::AccountName;
use crate::error::{Error, Result};
use crate::payload::{BranchPayload, Operation};

/// The default first token of every bank event's subject.
pub const DEFAULT_SUBJECT_PREFIX: &str = "twopc";

/// Events on for a bank: where they go, and how many may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// The relay: the NATS server, the stream (default `TWOPC`, created with
    /// subjects `<prefix>.>` if missing), batches, timeouts, backoff.
    pub relay: RelayConfig,
    /// The first token of every subject (default `twopc`); one per cluster
    /// sharing a NATS server, since two streams may not share subjects.
    pub subject_prefix: String,
}

impl EventsConfig {
    /// Events to the server at `nats_url`, every other setting at its default.
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self { relay: RelayConfig::new(nats_url), subject_prefix: DEFAULT_SUBJECT_PREFIX.into() }
    }

    /// These settings with the stream's subjects following `subject_prefix`.
    pub fn with_prefix(mut self, subject_prefix: impl Into<String>) -> Self {
        self.subject_prefix = subject_prefix.into();
        self.relay.subjects = vec![format!("{}.>", self.subject_prefix)];
        self
    }

    /// Checks every setting.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        check_subject(&self.subject_prefix).map_err(|why| Error::Config(format!("events.subject_prefix: {why}")))?;
        self.relay.validate().map_err(Error::Config)
    }

    /// What bank `bank`'s store needs to build its events.
    pub fn subjects(&self, bank: &ParticipantId) -> EventSubjects {
        EventSubjects { bank: bank.clone(), prefix: self.subject_prefix.clone() }
    }

    /// Starts publishing `store`'s outbox (woken by `wake`, the store's own):
    /// what a crash left unpublished goes out first. Publishing stops when
    /// the relay is dropped.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid relay settings.
    pub fn start_relay<S: OutboxSource>(&self, bank: &ParticipantId, store: Arc<S>, wake: RelayWake) -> Result<Relay> {
        let relay = Relay::spawn(store, wake, self.relay.clone()).map_err(Error::Config)?;
        info!(bank = %bank, nats = %self.relay.nats.shown_url(), stream = %self.relay.stream, "bank events on");
        Ok(relay)
    }
}

/// What a store needs to build a bank's events: the bank and the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSubjects {
    /// The bank whose branches these are.
    pub bank: ParticipantId,
    /// The subjects' first token.
    pub prefix: String,
}

impl EventSubjects {
    /// `<prefix>.<bank>.<account>`, a `.` in a name written `_` so that each
    /// name is one subject token (account names may start or end with a dot,
    /// which would make an empty token no stream takes); the event itself
    /// carries the exact names.
    fn subject(&self, account: &AccountName) -> String {
        let token = |name: &str| name.replace('.', "_");
        format!("{}.{}.{}", self.prefix, token(self.bank.as_str()), token(account.as_str()))
    }

    /// The events of `txn`'s branch: one per operation, in order.
    pub fn for_branch(&self, txn: TxnId, payload: &BranchPayload) -> Vec<OutboxEvent> {
        let (txn_id, bank) = (txn.to_string(), self.bank.to_string());
        payload
            .ops()
            .iter()
            .enumerate()
            .map(|(index, op)| {
                let (account, amount_minor) = (op.account().to_string(), op.amount_minor());
                let (txn_id, bank) = (txn_id.clone(), bank.clone());
                let event = match op {
                    Operation::Debit { .. } => {
                        bank_event::Event::Debited(pb::TransferDebited { txn_id, bank, account, amount_minor })
                    }
                    Operation::Credit { .. } => {
                        bank_event::Event::Credited(pb::TransferCredited { txn_id, bank, account, amount_minor })
                    }
                };
                let body = pb::BankEvent { id: event_id(txn, self.bank.as_str(), index), event: Some(event) };
                OutboxEvent { subject: self.subject(op.account()), payload: body.encode_to_vec().into() }
            })
            .collect()
    }

    /// The event of `account` opening with `initial_minor`, and its id.
    pub fn opened(&self, account: &AccountName, initial_minor: i64) -> (String, OutboxEvent) {
        let id = format!("opened:{account}@{}", self.bank);
        let opened = pb::AccountOpened { bank: self.bank.to_string(), account: account.to_string(), initial_minor };
        let body = pb::BankEvent { id: id.clone(), event: Some(bank_event::Event::Opened(opened)) };
        (id, OutboxEvent { subject: self.subject(account), payload: body.encode_to_vec().into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every name makes one valid subject token, whatever dots it has.
    #[test]
    fn every_account_name_makes_a_valid_subject() {
        let subjects = EventSubjects { bank: "eu.bank_2".parse().expect("id"), prefix: "twopc".into() };
        for name in ["alice", ".bob", "bob.", "a..b", "x.y.z"] {
            let account: AccountName = name.parse().expect("a valid account name");
            let subject = subjects.subject(&account);
            assert_eq!(check_subject(&subject), Ok(()), "{name} -> {subject}");
            assert_eq!(subject.split('.').count(), 3, "{name} -> {subject}");
        }
    }
}

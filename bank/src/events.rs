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

/// What a bank's store remembers of when its events were on, so it can say
/// what its event stream misses (docs/PROTOCOL.md §14.3). Each store keeps
/// the facts under [`EventHistory::FACTS`]' names, one number each (a flag
/// is 1 when set, absent otherwise).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventHistory {
    /// Set the first time the store opens with events on.
    events_on: bool,
    /// Set when the store opens with events off before they were ever on.
    off_before_events: bool,
    /// Accounts and prepared branches the store held when events were first
    /// turned on after it had run without them: none of them has its
    /// AccountOpened, or its branch's events.
    held_before_events: u64,
    /// Set when the store opens with events off after they were on: what it
    /// commits then publishes nothing.
    ran_without_events: bool,
}

impl EventHistory {
    /// The facts' names, as stored.
    pub(crate) const FACTS: [&'static str; 4] =
        ["events_on", "off_before_events", "held_before_events", "ran_without_events"];

    /// The history from the stored `(name, value)` facts; unknown names are
    /// ignored. A store from before this record has none, and is taken as
    /// having had events on whenever it opens with them on.
    pub(crate) fn from_facts<'a>(facts: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut history = Self::default();
        for (name, value) in facts {
            match name {
                "events_on" => history.events_on = true,
                "off_before_events" => history.off_before_events = true,
                "held_before_events" => history.held_before_events = value,
                "ran_without_events" => history.ran_without_events = true,
                _ => {}
            }
        }
        history
    }

    /// The facts to store, every one that is set.
    pub(crate) fn facts(&self) -> Vec<(&'static str, u64)> {
        let [on, off_before, held, ran_without] = Self::FACTS;
        let mut facts = Vec::with_capacity(4);
        facts.extend(self.events_on.then_some((on, 1)));
        facts.extend(self.off_before_events.then_some((off_before, 1)));
        facts.extend((self.held_before_events > 0).then_some((held, self.held_before_events)));
        facts.extend(self.ran_without_events.then_some((ran_without, 1)));
        facts
    }

    /// Whether this opening turns events on for the first time after the
    /// store ran without them: the store then counts what it holds
    /// (accounts and prepared branches) for [`EventHistory::record_opening`].
    pub(crate) fn turns_on_late(&self, events_on: bool) -> bool {
        events_on && !self.events_on && self.off_before_events
    }

    /// Records an opening with events `events_on`; `held_now` is what the
    /// store holds, counted only when [`EventHistory::turns_on_late`].
    pub(crate) fn record_opening(&mut self, events_on: bool, held_now: u64) {
        match (events_on, self.events_on) {
            (true, false) => {
                if self.off_before_events {
                    self.held_before_events = held_now;
                }
                self.events_on = true;
            }
            (false, false) => self.off_before_events = true,
            (false, true) => self.ran_without_events = true,
            (true, true) => {}
        }
    }

    /// With events on now (`events_on`), what the event stream misses of
    /// the bank's history, if anything, as the warning a store logs at
    /// every open; nothing with events off.
    pub(crate) fn missed(&self, events_on: bool) -> Option<String> {
        if !events_on || !self.events_on {
            return None;
        }
        let mut missed = Vec::new();
        if self.held_before_events > 0 {
            missed.push(format!(
                "{} accounts and prepared branches were there before events were turned on (no AccountOpened, \
                 no events of those branches)",
                self.held_before_events
            ));
        }
        if self.ran_without_events {
            missed.push(
                "the bank ran with events off after they were on (what it committed then published nothing)".into(),
            );
        }
        (!missed.is_empty()).then(|| {
            format!(
                "the event stream does not hold this bank's whole history: {}; a view built from it will not \
                 match this bank's balances (docs/PROTOCOL.md §14.3)",
                missed.join("; ")
            )
        })
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

    // The facts a store keeps give back the same history, so every later
    // opening still warns.
    #[test]
    fn an_event_history_survives_its_stored_facts() {
        let mut late = EventHistory::default();
        late.record_opening(false, 0);
        assert!(late.turns_on_late(true));
        late.record_opening(true, 3);
        late.record_opening(false, 0);
        let stored = EventHistory::from_facts(late.facts());
        assert_eq!(stored, late);
        assert_eq!(stored.missed(false), None, "nothing said with events off");
        let missed = stored.missed(true).expect("something missed");
        assert!(missed.contains("3 accounts") && missed.contains("ran with events off"), "{missed}");
        let mut early = EventHistory::default();
        early.record_opening(true, 0);
        assert!(!early.turns_on_late(true));
        assert_eq!(EventHistory::from_facts(early.facts()).missed(true), None);
    }
}

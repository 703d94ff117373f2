//! What the Raft log holds: [`Command`]s, and their stable binary encoding.
//!
//! Entries are encoded with prost messages defined here (not in the public
//! .proto files): the log is internal, but it outlives binaries, so every
//! field keeps its tag forever and decoding never panics on bad bytes.

use prost::Message;
use twopc_proto::{Decision, ParticipantId, PayloadDigest, TxnId, Vote};

use crate::error::{Error, Result};

/// One state-machine command, as proposed to and applied from the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Record the 2PC decision of a txn. The first one applied for a txn id
    /// wins; later ones change nothing and report the winner (I2).
    Decide(DecideCmd),
    /// The decision of a one-shot Submit that owns no Staged entry (sequential
    /// commit, and parallel commit's fallbacks; docs/PROTOCOL.md §5 step 7):
    /// applied as a [`Command::Decide`], except
    /// that it never decides a begun txn. A Begin of the same id may be
    /// applied after the Submit looked and before this entry: that txn is
    /// its own client's, decided only by its Commit, Rollback or timeout
    /// (§12.4), and this entry is refused. A binary from before this entry
    /// cannot decode it and stops, rather than apply it as a plain Decide.
    DecideOneShot(DecideCmd),
    /// Participants acknowledged having carried out decisions (logged lazily, in batches).
    Acknowledge(Vec<(TxnId, ParticipantId)>),
    /// Forget finished txns created before `horizon_unix_ms` (retention GC).
    Forget {
        /// Txns whose id was created before this time, and that are finished, leave the table.
        horizon_unix_ms: u64,
    },
    /// Name a participant's address (add or move).
    RegisterParticipant {
        /// The participant's name.
        name: ParticipantId,
        /// Its `host:port`.
        addr: String,
    },
    /// Remove a participant from the registry.
    RemoveParticipant {
        /// The participant's name.
        name: ParticipantId,
    },
    /// Log an interactive txn as begun, with its deadline (docs/PROTOCOL.md
    /// §12.1). The first one applied for a txn id wins; a txn the log has
    /// decided is never begun.
    Begin {
        /// The transaction.
        txn_id: TxnId,
        /// Unix milliseconds from which the txn is over: no branch joins, and
        /// a Commit proposed then is applied as Abort ("timed out").
        deadline_unix_ms: u64,
    },
    /// Stage one-shot txns under parallel commit (docs/PROTOCOL.md §13.1),
    /// each proposed while its Prepares are out; one entry carries those
    /// whose leaders asked while the previous one was in flight. A txn is
    /// committed once its Staged entry is applied and every participant named
    /// has durably voted YES; its Decide entry follows off the critical path.
    /// Each is applied exactly as an entry of its own would be.
    Staged(Vec<StagedCmd>),
    /// The Abort of a staged txn by the leader whose Staged entry staged it
    /// (docs/PROTOCOL.md §13.1), which never answered Commit: applied as a
    /// Decide entry, and for the staged txn without the NO vote any other
    /// Abort of it needs. `staged_log_index` names that Staged entry.
    AbortStaged {
        /// The log index of the Staged entry that staged the txn.
        staged_log_index: u64,
        /// The Abort, its reason and the votes received.
        decide: DecideCmd,
    },
    /// Many Decide entries' worth in one: the explicit decisions of staged
    /// txns committed under parallel commit, logged together (§13.2), so
    /// the log does not grow by an entry per txn for them. Each is applied
    /// exactly as its own Decide entry would be.
    Decisions(Vec<DecideCmd>),
    /// Join a participant's durably prepared branch to a begun txn (§12.3).
    /// Applied only while the txn is begun, undecided and, by the entry's
    /// proposer time, before its deadline.
    Join {
        /// The transaction.
        txn_id: TxnId,
        /// The participant whose branch joins.
        participant: ParticipantId,
    },
}

/// One txn of a [`Command::Staged`]: the first one applied for a txn id
/// wins; a txn the log has decided or begun is never staged.
#[derive(Debug, Clone, PartialEq)]
pub struct StagedCmd {
    /// The transaction.
    pub txn_id: TxnId,
    /// Every branch's participant: status recovery asks each for its vote.
    pub participants: Vec<ParticipantId>,
    /// Each branch's payload digest, in `participants`' order: status
    /// recovery asks each participant for its vote on exactly that payload
    /// (docs/PROTOCOL.md §13.3). Empty in entries logged before digests were.
    pub payload_digests: Vec<PayloadDigest>,
    /// The txn's deadline, Unix milliseconds.
    pub deadline_unix_ms: u64,
}

/// The content of a [`Command::Decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecideCmd {
    /// The transaction.
    pub txn_id: TxnId,
    /// Commit or Abort.
    pub decision: Decision,
    /// Why (a NO vote, a timeout, presumed abort, an operator's words); empty for commit.
    pub reason: String,
    /// Each branch and the vote it gave, if it answered.
    pub branches: Vec<(ParticipantId, Option<Vote>)>,
    /// The digest of each branch's payload, in the order of `branches`, when
    /// the proposer prepared them (a Submit's or an interactive Commit's
    /// driver): a one-shot txn's record keeps them, so a Commit is answered
    /// only to a Submit of these payloads (docs/PROTOCOL.md §3.1); a staged
    /// txn's record keeps its Staged entry's, and a begun txn's none. Empty
    /// when the proposer does not know them (a presumed abort, a timeout, an
    /// operator, status recovery).
    pub payload_digests: Vec<PayloadDigest>,
}

/// The longest reason a Decide entry keeps, in bytes: its own reason and each
/// NO vote's. Reasons come from participants and operators, and a log entry,
/// every snapshot and every ListTransactions page carries them, so a longer
/// one is cut ([`DecideCmd::cap_reasons`]) rather than kept whole (I6).
pub const REASON_MAX_BYTES: usize = 512;

/// Cuts `text` to at most [`REASON_MAX_BYTES`], on a char boundary.
fn cap(text: &mut String) {
    text.truncate(text.floor_char_boundary(REASON_MAX_BYTES));
}

impl DecideCmd {
    /// A decision naming no branches: a presumed abort, a timeout, an
    /// operator's; the state machine fills in what it knows (§6, §12).
    pub fn without_branches(txn_id: TxnId, decision: Decision, reason: String) -> Self {
        Self { txn_id, decision, reason, branches: Vec::new(), payload_digests: Vec::new() }
    }

    /// Cuts the reason and every NO vote's reason to [`REASON_MAX_BYTES`].
    pub fn cap_reasons(&mut self) {
        cap(&mut self.reason);
        for (_, vote) in &mut self.branches {
            if let Some(Vote::No { reason }) = vote {
                cap(reason);
            }
        }
    }
}

/// A command with the proposer's wall-clock time, which the state machine uses
/// instead of its own clock so every node applies it identically.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// The command.
    pub command: Command,
    /// The proposing leader's clock, Unix milliseconds.
    pub proposed_unix_ms: u64,
}

impl Proposal {
    /// Encodes for the log.
    pub fn encode(&self) -> Vec<u8> {
        wire::Entry::from(self).encode_to_vec()
    }

    /// Decodes a log entry's data.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the bytes are not a valid entry.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let entry = wire::Entry::decode(bytes).map_err(|e| Error::Corrupt(format!("log entry: {e}")))?;
        entry.try_into()
    }
}

/// Decodes a txn id stored as 16 bytes.
pub(crate) fn txn_id_from_wire(bytes: &[u8]) -> Result<TxnId> {
    let array: [u8; 16] =
        bytes.try_into().map_err(|_| Error::Corrupt(format!("txn id has {} bytes, not 16", bytes.len())))?;
    TxnId::from_bytes(array).map_err(|e| Error::Corrupt(e.to_string()))
}

/// Payload digests as the log and snapshots store them: 32 bytes each
/// (read back by [`digests_from_wire`]).
pub(crate) fn digests_to_wire(digests: &[PayloadDigest]) -> Vec<Vec<u8>> {
    digests.iter().map(|d| d.as_bytes().to_vec()).collect()
}

/// A Staged txn's payload digests as logged: none (an entry from before
/// digests), or one of 32 bytes per participant.
pub(crate) fn digests_from_wire(digests: &[Vec<u8>], participants: usize) -> Result<Vec<PayloadDigest>> {
    if !digests.is_empty() && digests.len() != participants {
        return Err(Error::Corrupt(format!("{} payload digests for {participants} participants", digests.len())));
    }
    digests.iter().map(|d| digest_from_wire(d)).collect()
}

/// Decodes one payload digest stored in the log or a snapshot.
pub(crate) fn digest_from_wire(bytes: &[u8]) -> Result<PayloadDigest> {
    PayloadDigest::from_slice(bytes).ok_or_else(|| Error::Corrupt(format!("a {}-byte payload digest", bytes.len())))
}

/// Decodes a participant name stored in the log.
pub(crate) fn participant_from_wire(name: &str) -> Result<ParticipantId> {
    name.parse().map_err(|e| Error::Corrupt(format!("{e}")))
}

/// Decodes a decision stored in the log.
pub(crate) fn decision_from_wire(value: i32) -> Result<Decision> {
    Decision::try_from(value).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A vote stored in the log: 0 no answer, 1 YES, 2 NO.
pub(crate) fn vote_from_wire(kind: i32, reason: &str) -> Result<Option<Vote>> {
    match kind {
        0 => Ok(None),
        1 => Ok(Some(Vote::Yes)),
        2 => Ok(Some(Vote::no(reason))),
        other => Err(Error::Corrupt(format!("vote kind {other}"))),
    }
}

/// The log encoding of a vote (see [`vote_from_wire`]).
pub(crate) fn vote_to_wire(vote: Option<&Vote>) -> (i32, String) {
    match vote {
        None => (0, String::new()),
        Some(Vote::Yes) => (1, String::new()),
        Some(Vote::No { reason }) => (2, reason.clone()),
    }
}

/// prost messages of the log encoding. Tags are forever.
pub(crate) mod wire {
    use prost::{Message, Oneof};

    #[derive(Clone, PartialEq, Message)]
    pub struct Entry {
        #[prost(uint64, tag = "1")]
        pub proposed_unix_ms: u64,
        #[prost(oneof = "Kind", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Decide(Decide),
        #[prost(message, tag = "3")]
        Acknowledge(Acknowledge),
        #[prost(uint64, tag = "4")]
        ForgetHorizonUnixMs(u64),
        #[prost(message, tag = "5")]
        RegisterParticipant(Participant),
        #[prost(string, tag = "6")]
        RemoveParticipant(String),
        #[prost(message, tag = "7")]
        Begin(Begin),
        #[prost(message, tag = "8")]
        Join(Join),
        #[prost(message, tag = "9")]
        Staged(StagedBatch),
        #[prost(message, tag = "10")]
        Decisions(Decisions),
        #[prost(message, tag = "11")]
        AbortStaged(AbortStaged),
        #[prost(message, tag = "12")]
        DecideOneShot(Decide),
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct AbortStaged {
        #[prost(uint64, tag = "1")]
        pub staged_log_index: u64,
        #[prost(message, optional, tag = "2")]
        pub decide: Option<Decide>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Staged {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(string, repeated, tag = "2")]
        pub participants: Vec<String>,
        #[prost(uint64, tag = "3")]
        pub deadline_unix_ms: u64,
        #[prost(bytes = "vec", repeated, tag = "4")]
        pub payload_digests: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct StagedBatch {
        #[prost(message, repeated, tag = "1")]
        pub txns: Vec<Staged>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Decisions {
        #[prost(message, repeated, tag = "1")]
        pub decisions: Vec<Decide>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Begin {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(uint64, tag = "2")]
        pub deadline_unix_ms: u64,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Join {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(string, tag = "2")]
        pub participant: String,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Decide {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(int32, tag = "2")]
        pub decision: i32,
        #[prost(string, tag = "3")]
        pub reason: String,
        #[prost(message, repeated, tag = "4")]
        pub branches: Vec<Branch>,
        #[prost(bytes = "vec", repeated, tag = "5")]
        pub payload_digests: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Branch {
        #[prost(string, tag = "1")]
        pub participant: String,
        #[prost(int32, tag = "2")]
        pub vote: i32,
        #[prost(string, tag = "3")]
        pub reason: String,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Acknowledge {
        #[prost(message, repeated, tag = "1")]
        pub acks: Vec<Ack>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Ack {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(string, tag = "2")]
        pub participant: String,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Participant {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub addr: String,
    }
}

impl From<&DecideCmd> for wire::Decide {
    fn from(d: &DecideCmd) -> Self {
        Self {
            txn_id: d.txn_id.to_bytes().to_vec(),
            decision: d.decision.into(),
            reason: d.reason.clone(),
            branches: d
                .branches
                .iter()
                .map(|(participant, vote)| {
                    let (vote, reason) = vote_to_wire(vote.as_ref());
                    wire::Branch { participant: participant.to_string(), vote, reason }
                })
                .collect(),
            payload_digests: digests_to_wire(&d.payload_digests),
        }
    }
}

impl TryFrom<wire::Decide> for DecideCmd {
    type Error = Error;

    fn try_from(d: wire::Decide) -> Result<Self> {
        let payload_digests = digests_from_wire(&d.payload_digests, d.branches.len())?;
        Ok(Self {
            txn_id: txn_id_from_wire(&d.txn_id)?,
            decision: decision_from_wire(d.decision)?,
            reason: d.reason,
            branches: d
                .branches
                .into_iter()
                .map(|b| Ok((participant_from_wire(&b.participant)?, vote_from_wire(b.vote, &b.reason)?)))
                .collect::<Result<_>>()?,
            payload_digests,
        })
    }
}

impl From<&Proposal> for wire::Entry {
    fn from(p: &Proposal) -> Self {
        let kind = match &p.command {
            Command::Decide(d) => wire::Kind::Decide(d.into()),
            Command::DecideOneShot(d) => wire::Kind::DecideOneShot(d.into()),
            Command::Decisions(ds) => {
                wire::Kind::Decisions(wire::Decisions { decisions: ds.iter().map(Into::into).collect() })
            }
            Command::AbortStaged { staged_log_index, decide } => wire::Kind::AbortStaged(wire::AbortStaged {
                staged_log_index: *staged_log_index,
                decide: Some(decide.into()),
            }),
            Command::Staged(txns) => wire::Kind::Staged(wire::StagedBatch {
                txns: txns
                    .iter()
                    .map(|st| wire::Staged {
                        txn_id: st.txn_id.to_bytes().to_vec(),
                        participants: st.participants.iter().map(ToString::to_string).collect(),
                        deadline_unix_ms: st.deadline_unix_ms,
                        payload_digests: digests_to_wire(&st.payload_digests),
                    })
                    .collect(),
            }),
            Command::Acknowledge(acks) => wire::Kind::Acknowledge(wire::Acknowledge {
                acks: acks
                    .iter()
                    .map(|(txn, p)| wire::Ack { txn_id: txn.to_bytes().to_vec(), participant: p.to_string() })
                    .collect(),
            }),
            Command::Forget { horizon_unix_ms } => wire::Kind::ForgetHorizonUnixMs(*horizon_unix_ms),
            Command::RegisterParticipant { name, addr } => {
                wire::Kind::RegisterParticipant(wire::Participant { name: name.to_string(), addr: addr.clone() })
            }
            Command::RemoveParticipant { name } => wire::Kind::RemoveParticipant(name.to_string()),
            Command::Begin { txn_id, deadline_unix_ms } => wire::Kind::Begin(wire::Begin {
                txn_id: txn_id.to_bytes().to_vec(),
                deadline_unix_ms: *deadline_unix_ms,
            }),
            Command::Join { txn_id, participant } => wire::Kind::Join(wire::Join {
                txn_id: txn_id.to_bytes().to_vec(),
                participant: participant.to_string(),
            }),
        };
        Self { proposed_unix_ms: p.proposed_unix_ms, kind: Some(kind) }
    }
}

impl TryFrom<wire::Entry> for Proposal {
    type Error = Error;

    fn try_from(entry: wire::Entry) -> Result<Self> {
        let command = match entry.kind.ok_or_else(|| Error::Corrupt("log entry without a command".into()))? {
            wire::Kind::Decide(d) => Command::Decide(d.try_into()?),
            wire::Kind::DecideOneShot(d) => Command::DecideOneShot(d.try_into()?),
            wire::Kind::AbortStaged(a) => Command::AbortStaged {
                staged_log_index: a.staged_log_index,
                decide: a
                    .decide
                    .ok_or_else(|| Error::Corrupt("AbortStaged without its decision".into()))?
                    .try_into()?,
            },
            wire::Kind::Decisions(ds) => {
                Command::Decisions(ds.decisions.into_iter().map(TryInto::try_into).collect::<Result<_>>()?)
            }
            wire::Kind::Staged(batch) => Command::Staged(
                batch
                    .txns
                    .into_iter()
                    .map(|st| {
                        Ok(StagedCmd {
                            txn_id: txn_id_from_wire(&st.txn_id)?,
                            participants: st
                                .participants
                                .iter()
                                .map(|p| participant_from_wire(p))
                                .collect::<Result<_>>()?,
                            payload_digests: digests_from_wire(&st.payload_digests, st.participants.len())?,
                            deadline_unix_ms: st.deadline_unix_ms,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            wire::Kind::Acknowledge(a) => Command::Acknowledge(
                a.acks
                    .into_iter()
                    .map(|ack| Ok((txn_id_from_wire(&ack.txn_id)?, participant_from_wire(&ack.participant)?)))
                    .collect::<Result<_>>()?,
            ),
            wire::Kind::ForgetHorizonUnixMs(horizon_unix_ms) => Command::Forget { horizon_unix_ms },
            wire::Kind::RegisterParticipant(p) => {
                Command::RegisterParticipant { name: participant_from_wire(&p.name)?, addr: p.addr }
            }
            wire::Kind::RemoveParticipant(name) => Command::RemoveParticipant { name: participant_from_wire(&name)? },
            wire::Kind::Begin(b) => {
                Command::Begin { txn_id: txn_id_from_wire(&b.txn_id)?, deadline_unix_ms: b.deadline_unix_ms }
            }
            wire::Kind::Join(j) => Command::Join {
                txn_id: txn_id_from_wire(&j.txn_id)?,
                participant: participant_from_wire(&j.participant)?,
            },
        };
        Ok(Self { command, proposed_unix_ms: entry.proposed_unix_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(s: &str) -> ParticipantId {
        s.parse().expect("valid name")
    }

    #[test]
    fn every_command_round_trips_through_the_log_encoding() {
        let txn = TxnId::new();
        let commands = [
            Command::Decide(DecideCmd {
                txn_id: txn,
                decision: Decision::Abort,
                reason: "bank-b voted NO: insufficient funds".into(),
                branches: vec![
                    (pid("bank-a"), Some(Vote::Yes)),
                    (pid("bank-b"), Some(Vote::no("x"))),
                    (pid("c"), None),
                ],
                payload_digests: [b"a".as_slice(), b"b", b"c"].into_iter().map(PayloadDigest::of).collect(),
            }),
            Command::Acknowledge(vec![(txn, pid("bank-a"))]),
            Command::Forget { horizon_unix_ms: 42 },
            Command::RegisterParticipant { name: pid("bank-a"), addr: "127.0.0.1:1".into() },
            Command::RemoveParticipant { name: pid("bank-a") },
            Command::Begin { txn_id: txn, deadline_unix_ms: 1_764_786_000_000 },
            Command::Join { txn_id: txn, participant: pid("bank-b") },
            Command::Staged(vec![StagedCmd {
                txn_id: txn,
                participants: vec![pid("bank-a"), pid("bank-b")],
                payload_digests: vec![PayloadDigest::of(b"debit"), PayloadDigest::of(b"credit")],
                deadline_unix_ms: 9,
            }]),
            Command::AbortStaged {
                staged_log_index: 12,
                decide: DecideCmd {
                    txn_id: txn,
                    decision: Decision::Abort,
                    reason: "b did not vote".into(),
                    branches: vec![(pid("a"), Some(Vote::Yes)), (pid("b"), None)],
                    payload_digests: Vec::new(),
                },
            },
            Command::DecideOneShot(DecideCmd {
                txn_id: txn,
                decision: Decision::Commit,
                reason: String::new(),
                branches: vec![(pid("a"), Some(Vote::Yes))],
                payload_digests: vec![PayloadDigest::of(b"debit")],
            }),
            Command::Decisions(vec![
                DecideCmd {
                    txn_id: txn,
                    decision: Decision::Commit,
                    reason: String::new(),
                    branches: vec![],
                    payload_digests: Vec::new(),
                },
                DecideCmd {
                    txn_id: TxnId::new(),
                    decision: Decision::Abort,
                    reason: "r".into(),
                    branches: vec![(pid("a"), Some(Vote::Yes))],
                    payload_digests: Vec::new(),
                },
            ]),
        ];
        for command in commands {
            let proposal = Proposal { command, proposed_unix_ms: 7 };
            assert_eq!(Proposal::decode(&proposal.encode()).expect("decodes"), proposal);
        }
    }

    // Tags are forever: a Begin is field 7 of the entry, a Join field 8, whatever a later
    // version adds, so a log written today replays under every later binary.
    #[test]
    fn begin_and_join_keep_their_log_tags() {
        let txn = TxnId::from_parts(1, [0; 10]);
        let begin = Proposal { command: Command::Begin { txn_id: txn, deadline_unix_ms: 2 }, proposed_unix_ms: 3 };
        // proposed_unix_ms (field 1, varint 3), then field 7 (length-delimited): txn id (field 1), deadline (field 2).
        let mut expected = vec![0x08, 3, 0x3a, 20, 0x0a, 16];
        expected.extend(txn.to_bytes());
        expected.extend([0x10, 2]);
        assert_eq!(begin.encode(), expected);
        let join = Proposal { command: Command::Join { txn_id: txn, participant: pid("a") }, proposed_unix_ms: 3 };
        let mut expected = vec![0x08, 3, 0x42, 21, 0x0a, 16];
        expected.extend(txn.to_bytes());
        expected.extend([0x12, 1, b'a']);
        assert_eq!(join.encode(), expected);
    }

    // I6: reasons are cut on a char boundary, never mid-character, and short ones are kept whole.
    #[test]
    fn reasons_are_capped_on_a_char_boundary() {
        let (mut short, mut split) = ("abc".to_owned(), format!("h{}", "é".repeat(REASON_MAX_BYTES / 2)));
        cap(&mut short);
        cap(&mut split);
        assert_eq!(short, "abc");
        assert_eq!(split, format!("h{}", "é".repeat(REASON_MAX_BYTES / 2 - 1)), "é is two bytes and is not split");
        let mut cmd = DecideCmd {
            txn_id: TxnId::new(),
            decision: Decision::Abort,
            reason: "é".repeat(REASON_MAX_BYTES),
            branches: vec![(pid("a"), Some(Vote::no("x".repeat(REASON_MAX_BYTES + 1)))), (pid("b"), Some(Vote::Yes))],
            payload_digests: Vec::new(),
        };
        cmd.cap_reasons();
        assert_eq!(cmd.reason, "é".repeat(REASON_MAX_BYTES / 2));
        assert_eq!(cmd.branches[0].1, Some(Vote::no("x".repeat(REASON_MAX_BYTES))));
        assert_eq!(cmd.branches[1].1, Some(Vote::Yes));
    }

    #[test]
    fn garbage_is_reported_as_corruption_not_a_panic() {
        assert!(matches!(Proposal::decode(&[0xff, 0xff, 0xff]), Err(Error::Corrupt(_))));
        assert!(matches!(Proposal::decode(&[]), Err(Error::Corrupt(_))));
    }

    // An entry of a kind this binary does not know (field 13, from a later
    // version) stops the node rather than being skipped: applying the rest of
    // the log without it would let replicas diverge. A binary from before
    // DecideOneShot (field 12) meets that entry the same way.
    #[test]
    fn an_entry_of_an_unknown_kind_is_refused_not_skipped() {
        let later_kind = [0x08, 3, 0x6a, 0];
        assert!(matches!(Proposal::decode(&later_kind), Err(Error::Corrupt(m)) if m.contains("without a command")));
    }
}

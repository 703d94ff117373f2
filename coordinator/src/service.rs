//! gRPC handlers for the client and admin APIs. Each converts wire types to
//! domain types first thing and maps errors to `Status` through
//! [`crate::error::Error`]'s single conversion.

use tonic::{Request, Response, Status};
use twopc_proto::pb;

use prost::Message as _;
use twopc_proto::{ParticipantId, Vote};

use crate::engine::{
    BeginRequest, CommitRequest, Engine, JoinRequest, LIST_PAGE_MAX_BYTES, ListRequest, OperatorDecideRequest,
    Resolution, RollbackRequest, SubmitRequest, TxnView, parse_txn_id,
};
use crate::node::{Membership, NodeHandle, NodeStatus, Role};
use crate::participant_client::ParticipantClient;
use crate::state_machine::TxnRecord;

/// The client API (`twopc.v1.Coordinator`).
pub struct CoordinatorService<P> {
    engine: Engine<P>,
}

impl<P> CoordinatorService<P> {
    /// Serves the client API through `engine`.
    pub fn new(engine: Engine<P>) -> Self {
        Self { engine }
    }
}

fn status_to_pb(s: &NodeStatus) -> pb::ClusterStatusResponse {
    let role = match s.role {
        Role::Follower => pb::Role::Follower,
        Role::Candidate => pb::Role::Candidate,
        Role::PreCandidate => pb::Role::PreCandidate,
        Role::Leader => pb::Role::Leader,
    };
    pb::ClusterStatusResponse {
        id: s.id,
        role: role.into(),
        term: s.term,
        leader_id: s.leader_id,
        leader_addr: s.leader_addr.clone().unwrap_or_default(),
        raft_committed_index: s.raft_committed_index,
        applied_index: s.applied_index,
        first_log_index: s.first_log_index,
        last_log_index: s.last_log_index,
        peers: s
            .peers
            .iter()
            .map(|p| pb::PeerStatus { id: p.id, addr: p.addr.clone(), match_index: p.match_index, voter: p.voter })
            .collect(),
    }
}

fn txn_to_pb(view: &TxnView) -> pb::TransactionInfo {
    match view {
        TxnView::Preparing { txn_id, participants } => pb::TransactionInfo {
            txn_id: txn_id.to_string(),
            state: pb::TxnState::Preparing.into(),
            branches: participants
                .iter()
                .map(|p| pb::BranchInfo { participant: p.to_string(), ..pb::BranchInfo::default() })
                .collect(),
            created_unix_ms: txn_id.created_unix_ms(),
            ..pb::TransactionInfo::default()
        },
        TxnView::Begun(b) => pb::TransactionInfo {
            txn_id: b.txn_id.to_string(),
            state: pb::TxnState::Begun.into(),
            // Each joined branch voted YES by joining (§12.3).
            branches: b
                .joined
                .iter()
                .map(|p| pb::BranchInfo {
                    participant: p.to_string(),
                    vote: pb::VoteKind::Yes.into(),
                    joined: true,
                    ..pb::BranchInfo::default()
                })
                .collect(),
            created_unix_ms: b.txn_id.created_unix_ms(),
            deadline_unix_ms: b.deadline_unix_ms,
            ..pb::TransactionInfo::default()
        },
        TxnView::Logged(r) => pb::TransactionInfo {
            txn_id: r.txn_id.to_string(),
            state: if r.is_finished() { pb::TxnState::Finished } else { pb::TxnState::Decided }.into(),
            decision: r.decision.into(),
            reason: r.reason.clone(),
            branches: r
                .branches
                .iter()
                .map(|b| {
                    let vote = b.vote.as_ref().map(Vote::to_pb).unwrap_or_default();
                    pb::BranchInfo {
                        participant: b.participant.to_string(),
                        vote: vote.vote,
                        reason: vote.reason,
                        acknowledged: b.acknowledged,
                        joined: b.joined,
                    }
                })
                .collect(),
            created_unix_ms: r.txn_id.created_unix_ms(),
            decided_unix_ms: r.decided_unix_ms,
            finished_unix_ms: r.finished_unix_ms.unwrap_or(0),
            decision_log_index: r.decision_log_index,
            deadline_unix_ms: r.deadline_unix_ms.unwrap_or(0),
        },
    }
}

/// The longest prefix of `views` whose encoding stays within `max_bytes`
/// (at least one txn), and whether it is shorter than `views` (I6: a page
/// must fit in a message).
fn page_within(views: &[TxnView], max_bytes: usize) -> (Vec<pb::TransactionInfo>, bool) {
    let mut page = Vec::new();
    let mut bytes = 0;
    for view in views {
        let info = txn_to_pb(view);
        // Each repeated field element costs its length prefix and tag too.
        let len = info.encoded_len() + prost::length_delimiter_len(info.encoded_len()) + 1;
        if !page.is_empty() && bytes + len > max_bytes {
            return (page, true);
        }
        bytes += len;
        page.push(info);
    }
    (page, false)
}

fn submit_to_pb(r: &TxnRecord) -> pb::SubmitResponse {
    pb::SubmitResponse {
        decision: r.decision.into(),
        votes: r
            .branches
            .iter()
            .map(|b| {
                let vote = b.vote.as_ref().map(Vote::to_pb).unwrap_or_default();
                pb::BranchVote { participant: b.participant.to_string(), vote: vote.vote, reason: vote.reason }
            })
            .collect(),
        reason: r.reason.clone(),
    }
}

fn optional_participant(name: &str) -> Result<Option<ParticipantId>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    name.parse().map(Some).map_err(|e| twopc_proto::status::invalid("participant", e))
}

#[tonic::async_trait]
impl<P: ParticipantClient> pb::coordinator_server::Coordinator for CoordinatorService<P> {
    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let submit = SubmitRequest::from_pb(request.into_inner(), self.engine.config())?;
        let record = self.engine.submit(submit).await?;
        Ok(Response::new(submit_to_pb(&record)))
    }

    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn resolve(&self, request: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveResponse>, Status> {
        // Over TLS a participant asks only as itself (docs/SECURITY.md).
        twopc_proto::auth::participant_acts_as_itself(&request, &request.get_ref().participant)?;
        let request = request.into_inner();
        let txn_id = parse_txn_id(&request.txn_id)?;
        // The asker learns only the decision for its own branch: Abort for a
        // txn whose record names other participants only (§6).
        let asker = optional_participant(&request.participant)?;
        let response = match self.engine.resolve(txn_id, asker.as_ref()).await? {
            Resolution::Decided(decision) => pb::ResolveResponse { decision: decision.into(), ..Default::default() },
            // A begun txn before its deadline: nothing is presumed (§12.5).
            Resolution::Undecided { retry_after_ms } => {
                pb::ResolveResponse { decision: pb::Decision::Unspecified.into(), undecided: true, retry_after_ms }
            }
        };
        Ok(Response::new(response))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let txn_id = parse_txn_id(&request.into_inner().txn_id)?;
        let view = self.engine.transaction(txn_id).await?;
        Ok(Response::new(txn_to_pb(&view)))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let list = ListRequest::from_pb(request.get_ref())?;
        let views = self.engine.list(&list).await?;
        let (transactions, cut) = page_within(&views, LIST_PAGE_MAX_BYTES);
        let next_after_txn_id = match transactions.last() {
            Some(last) if cut || views.len() == list.limit => last.txn_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTransactionsResponse { transactions, next_after_txn_id }))
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(status_to_pb(&self.engine.node().status())))
    }

    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn begin(&self, request: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        let begin = BeginRequest::from_pb(request.get_ref(), self.engine.config())?;
        let context = self.engine.begin(begin).await?;
        Ok(Response::new(pb::BeginResponse {
            context: Some(pb::TxnContext {
                txn_id: context.txn_id.to_string(),
                deadline_unix_ms: context.deadline_unix_ms,
            }),
        }))
    }

    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id, participant = %request.get_ref().participant))]
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        // Over TLS a participant joins only its own branch (docs/SECURITY.md).
        twopc_proto::auth::participant_acts_as_itself(&request, &request.get_ref().participant)?;
        let join = JoinRequest::from_pb(request.get_ref(), self.engine.config())?;
        let deadline_unix_ms = self.engine.join(join).await?;
        Ok(Response::new(pb::JoinResponse { deadline_unix_ms }))
    }

    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let commit = CommitRequest::from_pb(request.into_inner(), self.engine.config())?;
        let record = self.engine.commit(commit).await?;
        Ok(Response::new(submit_to_pb(&record)))
    }

    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let rollback = RollbackRequest::from_pb(request.get_ref(), self.engine.config())?;
        let record = self.engine.rollback(rollback).await?;
        Ok(Response::new(pb::RollbackResponse { decision: record.decision.into(), reason: record.reason }))
    }
}

/// The operator API (`twopc.v1.Admin`).
pub struct AdminService<P> {
    engine: Engine<P>,
}

impl<P: ParticipantClient> AdminService<P> {
    /// Serves the admin API through `engine`.
    pub fn new(engine: Engine<P>) -> Self {
        Self { engine }
    }

    fn node(&self) -> &NodeHandle {
        self.engine.node()
    }

    async fn membership(&self, change: Membership) -> Result<Response<pb::MembershipResponse>, Status> {
        self.node().change_membership(change).await?;
        Ok(Response::new(pb::MembershipResponse { status: Some(status_to_pb(&self.node().status())) }))
    }
}

fn participant_name(name: &str) -> Result<ParticipantId, Status> {
    name.parse().map_err(|e| twopc_proto::status::invalid("name", e))
}

fn host_port(addr: &str) -> Result<String, Status> {
    let valid = addr.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid {
        return Err(twopc_proto::status::invalid("addr", format!("{addr:?} is not host:port")));
    }
    Ok(addr.to_owned())
}

fn node_id(id: u64) -> Result<u64, Status> {
    if id == 0 {
        return Err(twopc_proto::status::invalid("node_id", "must be non-zero"));
    }
    Ok(id)
}

#[tonic::async_trait]
impl<P: ParticipantClient> pb::admin_server::Admin for AdminService<P> {
    #[tracing::instrument(skip_all, fields(txn_id = %request.get_ref().txn_id))]
    async fn decide(&self, request: Request<pb::DecideRequest>) -> Result<Response<pb::DecideResponse>, Status> {
        let decide = OperatorDecideRequest::from_pb(request.into_inner(), self.engine.config())?;
        let record = self.engine.operator_decide(decide).await?;
        Ok(Response::new(pb::DecideResponse { decision: record.decision.into() }))
    }

    async fn register_participant(
        &self,
        request: Request<pb::RegisterParticipantRequest>,
    ) -> Result<Response<pb::RegisterParticipantResponse>, Status> {
        // Over TLS a participant registers only itself (docs/SECURITY.md).
        twopc_proto::auth::participant_acts_as_itself(&request, &request.get_ref().name)?;
        let request = request.into_inner();
        let name = participant_name(&request.name)?;
        let addr = host_port(&request.addr)?;
        self.engine.register_participant(name, addr).await?;
        Ok(Response::new(pb::RegisterParticipantResponse {}))
    }

    async fn remove_participant(
        &self,
        request: Request<pb::RemoveParticipantRequest>,
    ) -> Result<Response<pb::RemoveParticipantResponse>, Status> {
        let name = participant_name(&request.into_inner().name)?;
        self.engine.remove_participant(name).await?;
        Ok(Response::new(pb::RemoveParticipantResponse {}))
    }

    async fn list_participants(
        &self,
        _: Request<pb::ListParticipantsRequest>,
    ) -> Result<Response<pb::ListParticipantsResponse>, Status> {
        let participants = self.engine.participants().await?;
        Ok(Response::new(pb::ListParticipantsResponse {
            participants: participants
                .into_iter()
                .map(|(name, addr)| pb::ParticipantInfo { name: name.to_string(), addr })
                .collect(),
        }))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.into_inner();
        let id = node_id(req.node_id)?;
        let addr = host_port(&req.addr)?;
        self.membership(Membership::AddVoter { id, addr }).await
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = node_id(request.into_inner().node_id)?;
        self.membership(Membership::Remove { id }).await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = node_id(request.into_inner().node_id)?;
        self.node().transfer_leader(id).await?;
        Ok(Response::new(pb::MembershipResponse { status: Some(status_to_pb(&self.node().status())) }))
    }
}

#[cfg(test)]
mod tests {
    use twopc_proto::{Decision, TxnId};

    use super::*;
    use crate::command::REASON_MAX_BYTES;
    use crate::state_machine::BranchRecord;

    fn big_record() -> TxnView {
        let participant: ParticipantId = "bank-a".parse().expect("valid name");
        TxnView::Logged(TxnRecord {
            txn_id: TxnId::new(),
            decision: Decision::Abort,
            reason: "r".repeat(REASON_MAX_BYTES),
            branches: vec![
                BranchRecord {
                    participant,
                    vote: Some(Vote::no("n".repeat(REASON_MAX_BYTES))),
                    acknowledged: true,
                    joined: false,
                    payload_digest: None,
                };
                16
            ],
            decided_unix_ms: 1,
            decision_log_index: 1,
            finished_unix_ms: Some(1),
            deadline_unix_ms: Some(1),
        })
    }

    // I6: a ListTransactions page of the largest records fits in a message: it ends early at
    // LIST_PAGE_MAX_BYTES and says so, so the caller pages on from its last txn.
    #[test]
    fn a_page_of_large_txns_stops_at_the_byte_limit() {
        let views: Vec<TxnView> = (0..crate::engine::LIST_LIMIT_MAX).map(|_| big_record()).collect();
        let (page, cut) = page_within(&views, LIST_PAGE_MAX_BYTES);
        assert!(cut, "1000 records of 16 long NO votes do not fit in one page");
        let response = pb::ListTransactionsResponse { transactions: page, next_after_txn_id: String::new() };
        assert!(response.encoded_len() <= LIST_PAGE_MAX_BYTES, "{} bytes", response.encoded_len());
        assert!(response.transactions.len() > 1);
        let (small, cut) = page_within(&views[..3], LIST_PAGE_MAX_BYTES);
        assert_eq!((small.len(), cut), (3, false));
        let (one, cut) = page_within(&views[..2], 1);
        assert_eq!((one.len(), cut), (1, true), "a page holds at least one txn");
    }
}

//! `twopc cluster`, `twopc participants` and `twopc txn`: the operator's view
//! of the cluster, through whichever node answers (leader hints followed).

use clap::{Args, Subcommand};
use serde_json::json;
use twopc_proto::pb;

use super::output::{ago, deadline, json, table};
use super::{ClusterArgs, EXIT_OK};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Each node's role, term and log indexes, as every node sees itself.
    #[command(
        after_help = "Example:\n  twopc cluster status --coordinators 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    Status(ClusterArgs),
    /// Add a node (start it first with `twopc coordinator --join`).
    #[command(after_help = "Example:\n  twopc cluster add 4 127.0.0.1:7004")]
    Add {
        /// The new node's id.
        id: u64,
        /// Its host:port.
        addr: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Remove a node from the cluster.
    #[command(after_help = "Example:\n  twopc cluster remove 4")]
    Remove {
        /// The node's id.
        id: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Hand leadership to another node.
    #[command(after_help = "Example:\n  twopc cluster transfer-leader 2")]
    TransferLeader {
        /// The node to lead.
        id: u64,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

fn role(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Leader) => "leader",
        Ok(pb::Role::Follower) => "follower",
        Ok(pb::Role::Candidate) => "candidate",
        Ok(pb::Role::PreCandidate) => "pre-candidate",
        _ => "unknown",
    }
}

pub async fn cluster(command: ClusterCommand) -> anyhow::Result<u8> {
    match command {
        ClusterCommand::Status(cluster) => status(&cluster).await,
        ClusterCommand::Add { id, addr, cluster } => {
            let request = pb::AddNodeRequest { node_id: id, addr };
            let client = cluster.client()?;
            client
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.add_node(request).await }
                })
                .await?;
            println!("node {id} added");
            Ok(EXIT_OK)
        }
        ClusterCommand::Remove { id, cluster } => {
            let client = cluster.client()?;
            client.admin(|mut c| async move { c.remove_node(pb::RemoveNodeRequest { node_id: id }).await }).await?;
            println!("node {id} removed");
            Ok(EXIT_OK)
        }
        ClusterCommand::TransferLeader { id, cluster } => {
            let client = cluster.client()?;
            client
                .admin(|mut c| async move { c.transfer_leader(pb::TransferLeaderRequest { node_id: id }).await })
                .await?;
            println!("asked the leader to hand over to node {id}");
            Ok(EXIT_OK)
        }
    }
}

/// Asks every given node for its own status (not only the leader's view).
async fn status(cluster: &ClusterArgs) -> anyhow::Result<u8> {
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for addr in &cluster.coordinators {
        let one = ClusterArgs { coordinators: vec![addr.clone()], json: cluster.json };
        let client = twopc_client::ClusterClient::new(
            one.coordinators.clone(),
            twopc_client::ClientConfig {
                tls: super::certs::cli_tls()?,
                retry_budget_ms: 0,
                attempt_timeout_ms: 2_000,
                ..Default::default()
            },
        )?;
        match client.coordinator(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await }).await {
            Ok(s) => {
                rows.push(vec![
                    s.id.to_string(),
                    addr.clone(),
                    role(s.role).to_owned(),
                    s.term.to_string(),
                    if s.leader_id == 0 { "-".into() } else { s.leader_id.to_string() },
                    s.raft_committed_index.to_string(),
                    s.applied_index.to_string(),
                    s.first_log_index.to_string(),
                ]);
                values.push(json!({
                    "id": s.id, "addr": addr, "role": role(s.role), "term": s.term, "leader_id": s.leader_id,
                    "raft_committed_index": s.raft_committed_index, "applied_index": s.applied_index,
                    "first_log_index": s.first_log_index, "last_log_index": s.last_log_index,
                    "peers": s.peers.iter().map(|p| json!({"id": p.id, "addr": p.addr, "voter": p.voter, "match_index": p.match_index})).collect::<Vec<_>>(),
                }));
            }
            Err(err) => {
                rows.push(vec![
                    "?".into(),
                    addr.clone(),
                    "unreachable".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                values.push(json!({"addr": addr, "error": err.message()}));
            }
        }
    }
    if cluster.json {
        json(&json!(values));
    } else {
        table(&["ID", "ADDRESS", "ROLE", " TERM", " LEADER", " COMMITTED", " APPLIED", " FIRST"], &rows);
    }
    let any_reachable = values.iter().any(|v| v.get("error").is_none());
    if !any_reachable {
        anyhow::bail!("no coordinator answered at {}", cluster.coordinators.join(","));
    }
    Ok(EXIT_OK)
}

#[derive(Debug, Subcommand)]
pub enum ParticipantsCommand {
    /// Name a participant's address (or move it).
    #[command(after_help = "Example:\n  twopc participants register bank-a 127.0.0.1:7101")]
    Register {
        /// The participant's name.
        name: String,
        /// Its host:port.
        addr: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Remove a participant from the registry.
    #[command(after_help = "Example:\n  twopc participants remove bank-a")]
    Remove {
        /// The participant's name.
        name: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List the registered participants.
    #[command(after_help = "Example:\n  twopc participants list")]
    List(ClusterArgs),
}

pub async fn participants(command: ParticipantsCommand) -> anyhow::Result<u8> {
    match command {
        ParticipantsCommand::Register { name, addr, cluster } => {
            let request = pb::RegisterParticipantRequest { name: name.clone(), addr: addr.clone() };
            cluster
                .client()?
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.register_participant(request).await }
                })
                .await?;
            println!("{name} registered at {addr}");
        }
        ParticipantsCommand::Remove { name, cluster } => {
            let request = pb::RemoveParticipantRequest { name: name.clone() };
            cluster
                .client()?
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.remove_participant(request).await }
                })
                .await?;
            println!("{name} removed");
        }
        ParticipantsCommand::List(cluster) => {
            let list = cluster
                .client()?
                .admin(|mut c| async move { c.list_participants(pb::ListParticipantsRequest {}).await })
                .await?;
            if cluster.json {
                json(&json!(
                    list.participants.iter().map(|p| json!({"name": p.name, "addr": p.addr})).collect::<Vec<_>>()
                ));
            } else {
                let rows: Vec<Vec<String>> =
                    list.participants.iter().map(|p| vec![p.name.clone(), p.addr.clone()]).collect();
                table(&["NAME", "ADDRESS"], &rows);
            }
        }
    }
    Ok(EXIT_OK)
}

#[derive(Debug, Subcommand)]
pub enum TxnCommand {
    /// List txns: all, undecided (being prepared, or begun interactively and still open), or not yet
    /// acknowledged.
    #[command(after_help = "Examples:\n  twopc txn list\n  twopc txn list --undecided\n  \
                      twopc txn list --unacknowledged --older-than-ms 10000")]
    List(ListArgs),
    /// Show one txn: its state and decision, an interactive txn's deadline, each branch's vote (joined
    /// branches voted yes by joining) and acknowledgement.
    #[command(after_help = "Example:\n  twopc txn show 019a2b3c-4d5e-7f60-8a1b-2c3d4e5f6a7b")]
    Show {
        /// The txn id.
        txn_id: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Settle an undecided txn by an operator's decision (logged; refused if already decided, or while
    /// the leader is still preparing it).
    #[command(
        after_help = "Example:\n  twopc txn decide 019a2b3c-4d5e-7f60-8a1b-2c3d4e5f6a7b abort --reason \"bank-b lost its disk\"\n\n\
                      A commit needs --force: the log holds no votes for an undecided txn, so check that every \
                      participant voted YES first. Committing a txn whose branch voted NO applies it at some \
                      participants and not others (money created or lost)."
    )]
    Decide {
        /// The txn id.
        txn_id: String,
        /// commit or abort.
        #[arg(value_parser = ["commit", "abort"])]
        decision: String,
        /// Why; kept in the log (at most 502 bytes).
        #[arg(long)]
        reason: String,
        /// Required to commit: you checked that every participant voted YES (see above).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only undecided txns: being prepared (nothing logged yet), or begun interactively and neither
    /// committed, rolled back nor timed out yet.
    #[arg(long, conflicts_with = "unacknowledged")]
    pub undecided: bool,
    /// Only decided txns some participant has not acknowledged.
    #[arg(long)]
    pub unacknowledged: bool,
    /// Only txns created at least this long ago (ms).
    #[arg(long, default_value_t = 0)]
    pub older_than_ms: u64,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

fn decision_text(value: i32) -> &'static str {
    match pb::Decision::try_from(value) {
        Ok(pb::Decision::Commit) => "commit",
        Ok(pb::Decision::Abort) => "abort",
        _ => "-",
    }
}

fn state_text(value: i32) -> &'static str {
    match pb::TxnState::try_from(value) {
        Ok(pb::TxnState::Preparing) => "preparing",
        Ok(pb::TxnState::Decided) => "decided",
        Ok(pb::TxnState::Finished) => "finished",
        Ok(pb::TxnState::Begun) => "begun",
        _ => "unknown",
    }
}

fn vote_text(value: i32) -> &'static str {
    match pb::VoteKind::try_from(value) {
        Ok(pb::VoteKind::Yes) => "yes",
        Ok(pb::VoteKind::No) => "no",
        _ => "-",
    }
}

/// Whether `t` is begun and undecided (docs/PROTOCOL.md §12): its branches
/// have all joined and none has a decision to acknowledge yet.
fn open(t: &pb::TransactionInfo) -> bool {
    t.state == pb::TxnState::Begun as i32
}

/// A branch's vote as shown: a joined branch's says so (it voted yes by joining, §12.3).
fn branch_vote_text(b: &pb::BranchInfo) -> String {
    if b.joined { "yes (joined)".into() } else { vote_text(b.vote).into() }
}

fn txn_json(t: &pb::TransactionInfo) -> serde_json::Value {
    json!({
        "txn_id": t.txn_id, "state": state_text(t.state), "decision": decision_text(t.decision), "reason": t.reason,
        "created_unix_ms": t.created_unix_ms, "decided_unix_ms": t.decided_unix_ms,
        "finished_unix_ms": t.finished_unix_ms, "decision_log_index": t.decision_log_index,
        "deadline_unix_ms": t.deadline_unix_ms, "interactive": t.deadline_unix_ms != 0,
        "branches": t.branches.iter().map(|b| json!({
            "participant": b.participant, "vote": vote_text(b.vote), "joined": b.joined, "reason": b.reason,
            "acknowledged": b.acknowledged,
        })).collect::<Vec<_>>(),
    })
}

pub async fn txn(command: TxnCommand) -> anyhow::Result<u8> {
    match command {
        TxnCommand::List(args) => {
            let filter = if args.undecided {
                pb::TxnFilter::Undecided
            } else if args.unacknowledged {
                pb::TxnFilter::Unacknowledged
            } else {
                pb::TxnFilter::All
            };
            let request = pb::ListTransactionsRequest {
                filter: filter.into(),
                older_than_ms: args.older_than_ms,
                limit: args.limit,
                after_txn_id: String::new(),
            };
            let list = args
                .cluster
                .client()?
                .coordinator(|mut c| {
                    let request = request.clone();
                    async move { c.list_transactions(request).await }
                })
                .await?;
            if args.cluster.json {
                json(&json!(list.transactions.iter().map(txn_json).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = list
                    .transactions
                    .iter()
                    .map(|t| {
                        // A begun txn's branches have joined; none has a decision to acknowledge yet.
                        let branches = if open(t) {
                            format!("{} joined", t.branches.len())
                        } else {
                            let acked = t.branches.iter().filter(|b| b.acknowledged).count();
                            format!("{acked}/{} acked", t.branches.len())
                        };
                        vec![
                            t.txn_id.clone(),
                            state_text(t.state).into(),
                            decision_text(t.decision).into(),
                            branches,
                            ago(t.created_unix_ms),
                            // The deadline matters while the txn is open; a decided one keeps it in `txn show`.
                            if open(t) { deadline(t.deadline_unix_ms) } else { "-".into() },
                            t.reason.clone(),
                        ]
                    })
                    .collect();
                table(&["TXN", "STATE", "DECISION", " BRANCHES", " CREATED", " DEADLINE", "REASON"], &rows);
            }
        }
        TxnCommand::Show { txn_id, cluster } => {
            let request = pb::GetTransactionRequest { txn_id };
            let t = cluster
                .client()?
                .coordinator(|mut c| {
                    let request = request.clone();
                    async move { c.get_transaction(request).await }
                })
                .await?;
            if cluster.json {
                json(&txn_json(&t));
            } else {
                println!("txn       {}", t.txn_id);
                println!("state     {}", state_text(t.state));
                println!(
                    "decision  {}{}",
                    decision_text(t.decision),
                    if t.reason.is_empty() { String::new() } else { format!(" ({})", t.reason) }
                );
                println!("created   {}", ago(t.created_unix_ms));
                if t.deadline_unix_ms != 0 {
                    println!(
                        "deadline  {}  (interactive: aborted as timed out if not committed by then)",
                        deadline(t.deadline_unix_ms)
                    );
                }
                println!("decided   {}  (log index {})", ago(t.decided_unix_ms), t.decision_log_index);
                println!("finished  {}", ago(t.finished_unix_ms));
                println!();
                let rows: Vec<Vec<String>> = t
                    .branches
                    .iter()
                    .map(|b| {
                        vec![
                            b.participant.clone(),
                            branch_vote_text(b),
                            if b.acknowledged { "yes".into() } else { "no".into() },
                            b.reason.clone(),
                        ]
                    })
                    .collect();
                table(&["BRANCH", "VOTE", "ACKNOWLEDGED", "REASON"], &rows);
            }
        }
        TxnCommand::Decide { txn_id, decision, reason, force, cluster } => {
            let decision = if decision == "commit" { pb::Decision::Commit } else { pb::Decision::Abort };
            let request =
                pb::DecideRequest { txn_id: txn_id.clone(), decision: decision.into(), reason, force_commit: force };
            let response = cluster
                .client()?
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.decide(request).await }
                })
                .await?;
            println!("{txn_id}: {} logged", decision_text(response.decision));
        }
    }
    Ok(EXIT_OK)
}

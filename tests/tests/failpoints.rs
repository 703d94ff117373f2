//! Crashes at the protocol's dangerous points, forced with failpoints
//! (feature `failpoints`, the fail crate; names in
//! `twopc_coordinator::failpoint` and `twopc_participant::failpoint`), each
//! followed by a heal and the invariant checker (I1, I2, I4, I7, I8) on a
//! whole system: 3 coordinators and 2 real banks.
//!
//! Then the checker is shown to bite: with a failpoint that breaks the
//! protocol on purpose, the seeded simulation reports the violation.
//!
//! The failpoint registry is process-global: every test holds a
//! `FailScenario` (one global lock) for its whole run, so they run one at a
//! time, and each starts and ends with every failpoint cleared.

use std::time::Duration;

use fail::FailScenario;
use twopc_bank::{AccountStore as _, BranchState};
use twopc_coordinator::Error;
use twopc_coordinator::command::{Command, DecideCmd, Proposal, StagedCmd};
use twopc_coordinator::config::CommitProtocol;
use twopc_coordinator::failpoint as coordinator_fp;
use twopc_coordinator::node::{Membership, Role};
use twopc_participant::failpoint as participant_fp;
use twopc_proto::{Decision, TxnId};
use twopc_tests::checker::{self, AccountRef, ClientOutcome, Invariant};
use twopc_tests::cluster::Cluster;
use twopc_tests::sim;
use twopc_tests::sim::schedule::FaultMix;
use twopc_tests::sim::world::{World, WorldConfig};
use twopc_tests::wait;

const SETTLE: Duration = Duration::from_secs(20);

fn account(bank: &str) -> AccountRef {
    AccountRef { bank: bank.into(), account: "acct-0".into() }
}

/// A world whose banks resolve in-doubt branches after `in_doubt_timeout_ms`,
/// committing by the default protocol (parallel, docs/PROTOCOL.md §13).
async fn world(in_doubt_timeout_ms: u64) -> anyhow::Result<World> {
    world_with(in_doubt_timeout_ms, CommitProtocol::default()).await
}

/// [`world`] committing by `commit_protocol`.
async fn world_with(in_doubt_timeout_ms: u64, commit_protocol: CommitProtocol) -> anyhow::Result<World> {
    twopc_tests::init_tracing();
    let config = WorldConfig { in_doubt_timeout_ms, commit_protocol, ..WorldConfig::default() };
    World::start(config).await
}

/// Heals, settles, checks, and fails the test on any violation.
async fn assert_invariants_hold(world: &mut World) -> anyhow::Result<()> {
    let verdict = world.heal_and_check().await?;
    assert!(verdict.violations.is_empty(), "violations:\n{}", checker::report(&verdict.violations));
    Ok(())
}

async fn branch(world: &World, bank: usize, txn: TxnId) -> Option<BranchState> {
    world.banks[bank].store.branch_state(txn).await.ok().flatten()
}

async fn wait_branch(world: &World, bank: usize, txn: TxnId, want: BranchState) -> anyhow::Result<()> {
    let what = format!("{}'s branch of {txn} to be {want:?}", world.banks[bank].name);
    wait::until(&what, SETTLE, || async { (branch(world, bank, txn).await == Some(want)).then_some(()) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_that_dies_between_its_fsync_and_its_vote_has_its_branch_aborted_and_released() -> anyhow::Result<()> {
    // I3 + I4: bank-b staged the credit durably but its YES never left. The
    // coordinator hears no vote, logs Abort, and delivers it to every branch,
    // the unanswered one included, which releases what bank-b staged.
    let _scenario = FailScenario::setup();
    let mut world = world(300).await?;
    fail::cfg(participant_fp::PREPARE_AFTER_DURABLE, "return(bank-b)").map_err(anyhow::Error::msg)?;
    let (txn, outcome) = world.transfer(&account("bank-a"), &account("bank-b"), 100).await;
    fail::remove(participant_fp::PREPARE_AFTER_DURABLE);
    assert_eq!(outcome, ClientOutcome::Aborted, "bank-b's vote was lost");
    wait_branch(&world, 1, txn, BranchState::Aborted).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_that_dies_after_its_fsync_finds_the_branch_on_restart_and_resolves_it() -> anyhow::Result<()> {
    // I7: the same crash, but phase 2 cannot reach bank-b and bank-b really
    // restarts: it finds the prepared branch in its store, asks the cluster,
    // and applies the logged Abort.
    let _scenario = FailScenario::setup();
    let mut world = world(300).await?;
    world.cluster.gate.fail_decides(true);
    fail::cfg(participant_fp::PREPARE_AFTER_DURABLE, "return(bank-b)").map_err(anyhow::Error::msg)?;
    let (txn, outcome) = world.transfer(&account("bank-a"), &account("bank-b"), 100).await;
    fail::remove(participant_fp::PREPARE_AFTER_DURABLE);
    assert_eq!(outcome, ClientOutcome::Aborted);
    assert_eq!(branch(&world, 1, txn).await, Some(BranchState::Prepared), "staged, and no decision delivered");
    world.banks[1].crash().await?;
    world.banks[1].restart().await?;
    wait_branch(&world, 1, txn, BranchState::Aborted).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_dies_between_proposing_and_applying_a_decision_leaves_exactly_one() -> anyhow::Result<()> {
    // I2: the leader appended the Commit entry and sent it to its followers,
    // then died before applying it. The next leader either commits that entry
    // or, if it never arrived, the txn is presumed aborted; either way every
    // node and both banks end with the same single decision.
    let _scenario = FailScenario::setup();
    let mut world = world(300).await?;
    let _ = world.settle().await;
    let old = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let old_term = world.cluster.node(old).status().term;
    fail::cfg(coordinator_fp::READY_BEFORE_APPLY, "1*return").map_err(anyhow::Error::msg)?;
    let (txn, outcome) = world.transfer(&account("bank-a"), &account("bank-b"), 100).await;
    // The dead node's server still answers (its raft task is gone); stop it.
    world.kill(old).await?;
    let new = wait::until("a new leader", SETTLE, || async { world.leader() }).await?;
    assert!(world.cluster.node(new).status().term > old_term, "a new term began");
    assert_invariants_hold(&mut world).await?;
    let decisions: Vec<_> =
        world.cluster.states().values().map(|sm| sm.txn(&txn).map(|r| (r.decision, r.decision_log_index))).collect();
    assert!(decisions.iter().all(|d| d.is_some() && *d == decisions[0]), "{decisions:?}");
    println!("client was told {outcome:?}; the log holds {:?}", decisions[0]);
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_applied_but_never_sent_is_resolved_by_the_banks() -> anyhow::Result<()> {
    // I7 through Resolve: the leader applied Commit and died before phase 2
    // (its retried Submit answered from the log first), and phase 2 cannot
    // reach the banks from the next leader either. The banks' in-doubt
    // timeout fires and Resolve gives them the logged Commit.
    let _scenario = FailScenario::setup();
    let mut world = world_with(300, CommitProtocol::Sequential).await?;
    let txn = TxnId::new();
    fail::cfg(coordinator_fp::DECIDE_AFTER_APPLIED, &format!("return({txn})")).map_err(anyhow::Error::msg)?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(outcome, ClientOutcome::Committed, "the retried Submit answers from the log");
    world.cluster.gate.fail_decides(true);
    world.kill(leader).await?;
    wait_branch(&world, 0, txn, BranchState::Committed).await?;
    wait_branch(&world, 1, txn, BranchState::Committed).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_applied_but_never_sent_is_delivered_by_the_next_leader() -> anyhow::Result<()> {
    // §8: the same crash point, then the leader really dies; the banks' in-doubt
    // timeout is far beyond the settle bound, so only the next leader's
    // re-drive of unacknowledged decisions can settle the branches.
    let _scenario = FailScenario::setup();
    let mut world = world_with(120_000, CommitProtocol::Sequential).await?;
    let txn = TxnId::new();
    fail::cfg(coordinator_fp::DECIDE_AFTER_APPLIED, &format!("return({txn})")).map_err(anyhow::Error::msg)?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(outcome, ClientOutcome::Committed);
    assert_eq!(branch(&world, 0, txn).await, Some(BranchState::Prepared), "phase 2 has not happened");
    world.kill(leader).await?;
    assert_invariants_hold(&mut world).await?;
    assert_eq!(branch(&world, 1, txn).await, Some(BranchState::Committed));
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_dies_between_phase_two_sends_has_the_rest_sent_by_the_next() -> anyhow::Result<()> {
    // I1 + I5 + §8: bank-a got Commit, bank-b did not, then the leader died.
    // The next leader re-drives: bank-b commits, bank-a (if its ack was not
    // logged yet) gets a repeat that changes nothing.
    let _scenario = FailScenario::setup();
    let mut world = world(120_000).await?;
    fail::cfg(coordinator_fp::DELIVERY_BEFORE_SEND, "return(bank-b)").map_err(anyhow::Error::msg)?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let (txn, outcome) = world.transfer(&account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(outcome, ClientOutcome::Committed);
    wait_branch(&world, 0, txn, BranchState::Committed).await?;
    assert_eq!(branch(&world, 1, txn).await, Some(BranchState::Prepared), "bank-b's send never happened");
    fail::remove(coordinator_fp::DELIVERY_BEFORE_SEND);
    world.kill(leader).await?;
    assert_invariants_hold(&mut world).await?;
    assert_eq!(branch(&world, 1, txn).await, Some(BranchState::Committed));
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_rollback_confirm_never_begun_through_the_log() -> anyhow::Result<()> {
    // §4.4, §12.4: a new leader's applied state may lag its log, so a Begin
    // the old leader answered is not yet applied there. Commit and Rollback
    // must not answer "never begun" (NOT_FOUND) from that state: they read
    // again through the log. The failpoint makes the local read find nothing
    // (a simulation seed met the real lag: a Rollback answered NOT_FOUND).
    let scenario = FailScenario::setup();
    let world = world(10_000).await?;
    let client = world.teller.client();
    let (rolled, committed) = (
        twopc_tests::calls::begin(client, None, 10_000).await?.txn_id,
        twopc_tests::calls::begin(client, None, 10_000).await?.txn_id,
    );
    let lags = |txn: TxnId| format!("return({txn})");
    fail::cfg(coordinator_fp::INTERACTIVE_LOCAL_STATE_LAGS, &lags(rolled)).map_err(anyhow::Error::msg)?;
    let rollback = twopc_tests::calls::rollback(client, rolled, "the customer cancelled").await;
    assert!(rollback.is_ok(), "a begun txn was answered {rollback:?}");
    fail::cfg(coordinator_fp::INTERACTIVE_LOCAL_STATE_LAGS, &lags(committed)).map_err(anyhow::Error::msg)?;
    let commit = twopc_tests::calls::commit(client, committed, Vec::new()).await?;
    assert_eq!(commit.decision, twopc_proto::pb::Decision::Commit as i32, "{commit:?}");
    let never = twopc_tests::calls::rollback(client, TxnId::new(), "nothing").await.map(|_| ()).map_err(|s| s.code());
    assert_eq!(never, Err(tonic::Code::NotFound), "a txn never begun is still answered NOT_FOUND");
    scenario.teardown();
    world.stop().await;
    Ok(())
}

/// §5 step 7, §12.4: a one-shot Submit of T found T not begun, but a Begin
/// of T was applied before the Submit's decision (the failpoint makes the
/// Submit's check miss the Begin). The log must not let the Submit decide
/// the begun txn, Commit or Abort: it refuses the Submit's entry, the
/// Submit is told no decision, and T stays its own client's. T's Commit
/// names no branch, so the Submit's branches end without committing: bank-a
/// `at_a`, bank-b aborted. Before the log refused it, a Submit committed T
/// (sequential) or aborted it (a NO under either protocol), T's client unasked.
async fn a_submit_never_decides_a_txn_begun_while_it_ran(
    protocol: CommitProtocol,
    amount_minor: i64,
    at_a: BranchState,
) -> anyhow::Result<()> {
    let _scenario = FailScenario::setup();
    let mut world = world_with(300, protocol).await?;
    let client = world.teller.client();
    let txn = twopc_tests::calls::begin(client, None, 10_000).await?.txn_id;
    fail::cfg(coordinator_fp::SUBMIT_RACES_BEGIN, &format!("return({txn})")).map_err(anyhow::Error::msg)?;
    let submitted = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), amount_minor).await;
    assert_eq!(submitted, ClientOutcome::Unknown, "refused (FAILED_PRECONDITION), never told a decision");
    let commit = twopc_tests::calls::commit(client, txn, Vec::new()).await?;
    assert_eq!(commit.decision, twopc_proto::pb::Decision::Commit as i32, "T is still its own client's");
    wait_branch(&world, 0, txn, at_a).await?;
    wait_branch(&world, 1, txn, BranchState::Aborted).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_is_never_told_the_outcome_of_a_txn_begun_while_it_ran() -> anyhow::Result<()> {
    // §5 step 7: T is begun and its client's Commit is preparing T's
    // one-shot transfer of 100 (held at the banks' answers). A Submit of T
    // for 250, whose check missed the Begin, finds that Commit running and
    // would wait for its outcome: it must not be told Commit, for its 250
    // never moved (the interactive record names no payloads to compare).
    let _scenario = FailScenario::setup();
    let world = world_with(120_000, CommitProtocol::Sequential).await?;
    let client = world.teller.client().clone();
    let txn = twopc_tests::calls::begin(&client, None, 10_000).await?.txn_id;
    world.cluster.gate.hold_after_prepare(true);
    let branches = transfer_branches(100)?;
    let commit = tokio::spawn(async move { twopc_tests::calls::commit(&client, txn, branches).await });
    let gate = world.cluster.gate.clone();
    wait::until("both branches prepared", SETTLE, || async { (gate.prepares_answered() >= 2).then_some(()) }).await?;
    fail::cfg(coordinator_fp::SUBMIT_RACES_BEGIN, &format!("return({txn})")).map_err(anyhow::Error::msg)?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let before = waited_on_running(&world, leader)?;
    let teller = world.teller.clone();
    let submit =
        tokio::spawn(async move { teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 250).await });
    wait_for_waiters(&world, leader, before + 1).await?;
    world.cluster.gate.hold_after_prepare(false);
    let committed = commit.await??;
    assert_eq!(committed.decision, twopc_proto::pb::Decision::Commit as i32, "T's own Commit");
    assert_eq!(submit.await?, ClientOutcome::Unknown, "refused (FAILED_PRECONDITION), never told T's Commit");
    world.stop().await;
    Ok(())
}

/// How many calls node `id` has had wait on a txn it was driving.
fn waited_on_running(world: &World, id: u64) -> anyhow::Result<u64> {
    world.cluster.counter(id, "twopc_calls_waited_on_running_total")
}

/// Waits until node `id` has had `n` calls wait on a txn it was driving.
async fn wait_for_waiters(world: &World, id: u64, n: u64) -> anyhow::Result<()> {
    let what = format!("{n} calls waiting on a running txn at node {id}");
    wait::until(&what, SETTLE, || async { (waited_on_running(world, id).ok()? >= n).then_some(()) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_waited_on_a_racing_submit_is_told_to_retry_and_then_commits() -> anyhow::Result<()> {
    // §5 step 7, §12.4: T is begun; a Submit of T whose check missed the
    // Begin is preparing (held at the banks' answers) when T's client
    // commits. The Commit waits for that Submit, whose decision the log
    // refuses; it must then be told to retry (UNAVAILABLE, which the client
    // does), not the Submit's "submit under a new txn id", since T is still
    // its client's. Its retry commits T.
    let _scenario = FailScenario::setup();
    let mut world = world_with(300, CommitProtocol::Sequential).await?;
    let client = world.teller.client().clone();
    let txn = twopc_tests::calls::begin(&client, None, 10_000).await?.txn_id;
    fail::cfg(coordinator_fp::SUBMIT_RACES_BEGIN, &format!("return({txn})")).map_err(anyhow::Error::msg)?;
    world.cluster.gate.hold_after_prepare(true);
    let teller = world.teller.clone();
    let submit =
        tokio::spawn(async move { teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await });
    let gate = world.cluster.gate.clone();
    wait::until("both branches prepared", SETTLE, || async { (gate.prepares_answered() >= 2).then_some(()) }).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let before = waited_on_running(&world, leader)?;
    let commit = tokio::spawn(async move { twopc_tests::calls::commit(&client, txn, Vec::new()).await });
    wait_for_waiters(&world, leader, before + 1).await?;
    world.cluster.gate.hold_after_prepare(false);
    assert_eq!(submit.await?, ClientOutcome::Unknown, "refused (FAILED_PRECONDITION), never told a decision");
    let committed = commit.await?;
    let committed = committed.map_err(|s| anyhow::anyhow!("T's Commit was answered {:?} {}", s.code(), s.message()))?;
    assert_eq!(committed.decision, twopc_proto::pb::Decision::Commit as i32, "T's own Commit");
    wait_branch(&world, 0, txn, BranchState::Aborted).await?;
    wait_branch(&world, 1, txn, BranchState::Aborted).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

/// More than any account holds: bank-a votes NO.
const OVERDRAWN_MINOR: i64 = 1_000_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_submit_never_commits_a_txn_begun_while_it_ran() -> anyhow::Result<()> {
    a_submit_never_decides_a_txn_begun_while_it_ran(CommitProtocol::Sequential, 100, BranchState::Aborted).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_submit_never_aborts_a_txn_begun_while_it_ran() -> anyhow::Result<()> {
    let (protocol, refused) = (CommitProtocol::Sequential, BranchState::Refused);
    a_submit_never_decides_a_txn_begun_while_it_ran(protocol, OVERDRAWN_MINOR, refused).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_submit_never_aborts_a_txn_begun_while_it_ran() -> anyhow::Result<()> {
    let (protocol, refused) = (CommitProtocol::Parallel, BranchState::Refused);
    a_submit_never_decides_a_txn_begun_while_it_ran(protocol, OVERDRAWN_MINOR, refused).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_batch_whose_proposal_failed_is_proposed_again() -> anyhow::Result<()> {
    // §5 step 5: the leader's proposal of a batch of acknowledgements fails
    // (as an overloaded node's would). The batch is proposed again, so within
    // the same term the txn is finished and nothing stays unacknowledged.
    let _scenario = FailScenario::setup();
    let mut world = world(120_000).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let term = world.cluster.node(leader).status().term;
    fail::cfg(coordinator_fp::ACKS_BEFORE_PROPOSE, "1*return").map_err(anyhow::Error::msg)?;
    let (txn, outcome) = world.transfer(&account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(outcome, ClientOutcome::Committed);
    let finished = wait::until("the txn to be acknowledged by both banks", SETTLE, || async {
        world.cluster.node(leader).local_read(|sm| {
            let finished = sm.txn(&txn).is_some_and(|r| r.is_finished());
            (finished && sm.unacknowledged_count() == 0).then_some(())
        })
    })
    .await;
    fail::remove(coordinator_fp::ACKS_BEFORE_PROPOSE);
    finished?;
    assert_eq!(world.cluster.node(leader).status().term, term, "acknowledged by the same leader, not re-driven");
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

/// Arms `failpoint` for `txn`, runs the transfer, then kills the leader and
/// clears the failpoint: the next leader must settle the staged txn.
async fn parallel_crash(world: &mut World, failpoint: &str, txn: TxnId) -> anyhow::Result<ClientOutcome> {
    fail::cfg(failpoint, &format!("return({txn})")).map_err(anyhow::Error::msg)?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await;
    world.kill(leader).await?;
    fail::remove(failpoint);
    Ok(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_commit_whose_leader_stops_after_staging_is_committed_by_status_recovery() -> anyhow::Result<()> {
    // §13.4: the Staged entry is applied and both banks voted YES (the txn
    // is committed), then the leader stops before answering (every retry of
    // the client stops there too). Nobody was told; status recovery finds both YES and logs Commit,
    // which both banks apply. The banks' in-doubt timeout is far beyond the
    // settle bound, so only recovery by a leader can settle them.
    let _scenario = FailScenario::setup();
    let mut world = world(120_000).await?;
    let txn = TxnId::new();
    let outcome = parallel_crash(&mut world, coordinator_fp::PARALLEL_AFTER_STAGED, txn).await?;
    assert_ne!(outcome, ClientOutcome::Aborted, "both banks voted YES");
    wait_branch(&world, 0, txn, BranchState::Committed).await?;
    wait_branch(&world, 1, txn, BranchState::Committed).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_commit_answered_but_never_logged_is_logged_commit_by_the_next_leader() -> anyhow::Result<()> {
    // §13.4, the point that matters: the client was told Commit and the log
    // holds only the Staged entry when the leader dies. The next leader's
    // status recovery must log Commit (a presumed abort here would break I8).
    let _scenario = FailScenario::setup();
    let mut world = world(120_000).await?;
    let txn = TxnId::new();
    let outcome = parallel_crash(&mut world, coordinator_fp::PARALLEL_AFTER_ANSWER, txn).await?;
    assert_eq!(outcome, ClientOutcome::Committed, "the answer came before the Decide entry");
    wait::until("every node to hold Commit", SETTLE, || async {
        let states = world.cluster.states();
        states.values().all(|sm| sm.txn(&txn).is_some_and(|r| r.decision == Decision::Commit)).then_some(())
    })
    .await?;
    wait_branch(&world, 0, txn, BranchState::Committed).await?;
    wait_branch(&world, 1, txn, BranchState::Committed).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_recovery_that_stops_before_deciding_is_redone_with_the_same_outcome() -> anyhow::Result<()> {
    // §13.4 mid-recovery: the first recoveries stop after asking the banks;
    // asking again gets the same votes, and the txn told Commit is logged Commit.
    let _scenario = FailScenario::setup();
    let mut world = world(120_000).await?;
    let txn = TxnId::new();
    fail::cfg(coordinator_fp::RECOVERY_BEFORE_DECIDE, &format!("3*return({txn})")).map_err(anyhow::Error::msg)?;
    let outcome = parallel_crash(&mut world, coordinator_fp::PARALLEL_AFTER_ANSWER, txn).await?;
    assert_eq!(outcome, ClientOutcome::Committed);
    let settled = wait_branch(&world, 0, txn, BranchState::Committed).await;
    fail::remove(coordinator_fp::RECOVERY_BEFORE_DECIDE);
    settled?;
    wait_branch(&world, 1, txn, BranchState::Committed).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

/// The branches of a transfer of `amount_minor` from bank-a's to bank-b's account.
fn transfer_branches(amount_minor: i64) -> anyhow::Result<Vec<twopc_proto::pb::Branch>> {
    let address = |bank: &str| format!("{}@{bank}", account(bank).account).parse().expect("an account address");
    Ok(twopc_bank::Transfer::new(address("bank-a"), address("bank-b"), amount_minor)?.submit_branches())
}

/// Logs a Staged entry for `txn` on node `leader` naming `branches`, with
/// their payload digests or, as an entry logged before digests, none.
async fn stage(
    world: &World,
    leader: u64,
    txn: TxnId,
    branches: &[twopc_proto::pb::Branch],
    digests: bool,
    deadline_unix_ms: u64,
) -> anyhow::Result<()> {
    let payload_digests = branches.iter().map(|b| twopc_proto::PayloadDigest::of(&b.payload));
    let staged = Command::Staged(vec![StagedCmd {
        txn_id: txn,
        participants: branches.iter().map(|b| b.participant.parse()).collect::<Result<_, _>>()?,
        payload_digests: if digests { payload_digests.collect() } else { Vec::new() },
        deadline_unix_ms,
    }]);
    let proposal = Proposal { command: staged, proposed_unix_ms: twopc_proto::txn_id::unix_now_ms() };
    world.cluster.node(leader).propose(&proposal).await?;
    Ok(())
}

/// `txn`'s record on node `leader` once status recovery has decided it.
async fn decided(
    world: &World,
    leader: u64,
    txn: TxnId,
) -> anyhow::Result<twopc_coordinator::state_machine::TxnRecord> {
    wait::until("status recovery to decide the txn", SETTLE, || async {
        world.cluster.node(leader).local_read(|sm| sm.txn(&txn).cloned())
    })
    .await
}

/// Prepares `branch` of `txn` at its bank, as a leader that is then lost
/// would have, and checks it voted YES.
async fn prepare_directly(
    world: &World,
    txn: TxnId,
    branch: twopc_proto::pb::Branch,
    deadline_unix_ms: u64,
) -> anyhow::Result<()> {
    let mut bank = world.teller.bank_participant(&branch.participant).expect("a bank");
    let request = twopc_proto::pb::PrepareRequest {
        txn_id: txn.to_string(),
        participant: branch.participant,
        payload: branch.payload,
        deadline_unix_ms,
    };
    let vote = bank.prepare(request).await?.into_inner();
    anyhow::ensure!(vote.vote == twopc_proto::pb::VoteKind::Yes as i32, "{vote:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_txn_a_bank_never_prepared_is_aborted_and_its_late_prepare_refused() -> anyhow::Result<()> {
    // §13.3: a Staged entry whose Prepares never arrived (its leader died at
    // once). Status recovery asks both banks; each holds no record, leaves a
    // tombstone and answers NO, so the log gets Abort, and a Submit of the
    // same txn, prepared now, cannot commit it.
    let _scenario = FailScenario::setup();
    let mut world = world(120_000).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let txn = TxnId::new();
    // As an entry logged before digests: recovery asks for any payload.
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    stage(&world, leader, txn, &transfer_branches(100)?, false, deadline_unix_ms).await?;
    let record = decided(&world, leader, txn).await?;
    assert_eq!(record.decision, Decision::Abort, "{record:?}");
    assert!(record.reason.starts_with("status recovery"), "{record:?}");
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(outcome, ClientOutcome::Aborted);
    assert_eq!(branch(&world, 0, txn).await, Some(BranchState::Tombstone), "bank-a staged nothing");
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_of_a_staged_txn_never_prepares_payloads_of_its_own() -> anyhow::Result<()> {
    // §13: txn T is staged, bank-a has prepared T's debit of 100 and voted
    // YES, and T's credit never reached bank-b (its leader died). A Submit of
    // T naming the same banks with other payloads (a transfer of 250) must
    // not prepare them: bank-b would stage a credit of 250 beside bank-a's
    // debit of 100, and the Commit their YES votes make would mint 150 (I8).
    // It settles T by T's own votes instead: bank-b never saw T, so it keeps
    // a tombstone and votes NO, and T aborts.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    // The scan would settle T on its own first; this Submit must meet it staged.
    let config =
        WorldConfig { in_doubt_timeout_ms: 120_000, begun_scan_interval_ms: 120_000, ..WorldConfig::default() };
    let mut world = World::start(config).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let txn = TxnId::new();
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    let branches = transfer_branches(100)?;
    // As an entry logged before digests (with them, the Submit is refused
    // outright: `a_submit_with_other_payloads_than_the_staged_ones_is_refused`).
    stage(&world, leader, txn, &branches, false, deadline_unix_ms).await?;
    let debit = branches.into_iter().find(|b| b.participant == "bank-a").expect("a debit");
    prepare_directly(&world, txn, debit, deadline_unix_ms).await?;
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 250).await;
    assert_eq!(outcome, ClientOutcome::Aborted, "T is decided by its own votes, and bank-b has none");
    assert_eq!(branch(&world, 1, txn).await, Some(BranchState::Tombstone), "bank-b staged nothing of the Submit's");
    wait_branch(&world, 0, txn, BranchState::Aborted).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

/// §3.1: a Prepare of txn T from a leader that was then deposed reached
/// bank-a only (a debit of 100), and nothing of T is in the log. The client
/// retries T on the new leader with other payloads (a transfer of 250).
/// bank-a must not answer its recorded YES for the debit of 100: with
/// bank-b staging the credit of 250, the Commit those votes made would mint
/// 150 (I8; seen before bank-a refused the repeat). It refuses the repeat
/// instead, so T aborts, and its debit of 100 is released.
async fn a_retry_with_other_payloads_after_a_lost_leader(protocol: CommitProtocol) -> anyhow::Result<()> {
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    let config = WorldConfig { commit_protocol: protocol, in_doubt_timeout_ms: 120_000, ..WorldConfig::default() };
    let mut world = World::start(config).await?;
    let txn = TxnId::new();
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    let debit = transfer_branches(100)?.into_iter().find(|b| b.participant == "bank-a").expect("a debit");
    prepare_directly(&world, txn, debit, deadline_unix_ms).await?;
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 250).await;
    assert_eq!(outcome, ClientOutcome::Aborted, "bank-a refused the other payload, so T cannot commit");
    wait_branch(&world, 0, txn, BranchState::Aborted).await?;
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_retry_with_other_payloads_never_mixes_two_transfers() -> anyhow::Result<()> {
    a_retry_with_other_payloads_after_a_lost_leader(CommitProtocol::Sequential).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_retry_with_other_payloads_never_mixes_two_transfers() -> anyhow::Result<()> {
    a_retry_with_other_payloads_after_a_lost_leader(CommitProtocol::Parallel).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_with_other_payloads_than_the_staged_ones_is_refused() -> anyhow::Result<()> {
    // §13.1: T is staged with the payloads of a transfer of 100. A Submit of
    // T with a transfer of 250 is refused before it prepares anything (its
    // outcome would be the staged txn's, not its own), and T is left to
    // status recovery.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    let config = WorldConfig { begun_scan_interval_ms: 120_000, ..WorldConfig::default() };
    let world = World::start(config).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let txn = TxnId::new();
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    stage(&world, leader, txn, &transfer_branches(100)?, true, deadline_unix_ms).await?;
    let outcome = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 250).await;
    assert_eq!(outcome, ClientOutcome::Unknown, "refused (FAILED_PRECONDITION), never told T's outcome");
    assert_eq!(branch(&world, 0, txn).await, None, "bank-a was sent nothing");
    assert_eq!(branch(&world, 1, txn).await, None, "bank-b was sent nothing");
    world.stop().await;
    Ok(())
}

/// After `txn` committed a transfer of 100 from bank-a to bank-b: a Submit
/// of it for 250 is refused (FAILED_PRECONDITION, seen as Unknown), never
/// told Commit, and one for the same 100 is told Commit (§3.1). Stops the world.
async fn retries_are_told_commit_only_for_their_own_payloads(world: World, txn: TxnId) -> anyhow::Result<()> {
    let other = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 250).await;
    assert_eq!(other, ClientOutcome::Unknown, "refused (FAILED_PRECONDITION), never told Commit for 250");
    let same = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(same, ClientOutcome::Committed, "a retry with the same payloads is told the Commit");
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_committed_with_other_payloads_is_never_answered_commit_to_a_retry() -> anyhow::Result<()> {
    // §3.1, §13.1: T was staged and prepared with a transfer of 100, and
    // status recovery committed it. A Submit of T with a transfer of 250
    // finds it decided: it must not be told Commit, for its 250 never moved
    // (before the record kept the staged digests, it was). A retry with the
    // same payloads is told Commit.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    let world = World::start(WorldConfig::default()).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let txn = TxnId::new();
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    for branch in transfer_branches(100)? {
        prepare_directly(&world, txn, branch, deadline_unix_ms).await?;
    }
    stage(&world, leader, txn, &transfer_branches(100)?, true, deadline_unix_ms).await?;
    let record = decided(&world, leader, txn).await?;
    assert_eq!(record.decision, Decision::Commit, "{record:?}");
    retries_are_told_commit_only_for_their_own_payloads(world, txn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_commit_with_other_payloads_is_never_answered_commit_to_a_retry() -> anyhow::Result<()> {
    // §3.1, §5: under sequential commit T commits a transfer of 100. A
    // Submit of T with a transfer of 250 finds it decided in the log, asks
    // no participant, and must not be told Commit: its 250 never moved
    // (before Decide entries kept the payload digests, it was). A retry
    // with the same payloads is told Commit.
    let _scenario = FailScenario::setup();
    let world = world_with(10_000, CommitProtocol::Sequential).await?;
    let txn = TxnId::new();
    let first = world.teller.transfer_as(txn, &account("bank-a"), &account("bank-b"), 100).await;
    assert_eq!(first, ClientOutcome::Committed);
    retries_are_told_commit_only_for_their_own_payloads(world, txn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_recovery_asks_for_the_staged_payloads_and_never_commits_another_submits() -> anyhow::Result<()> {
    // §13.3: T is staged with the payloads of a transfer of 100, but the
    // branches the banks hold are another Submit's of the same id: bank-a a
    // debit of 250, bank-b a credit of 250 (that Submit's Staged entry lost
    // the race, and its leader died before learning it). Each bank voted YES
    // on its branch. Recovery must not read those YES votes as votes on the
    // staged payloads (a Commit would apply a transfer no Staged entry
    // names): each bank answers NO for the staged digest, and T aborts. A
    // NO voter is sent no Abort (§11), so each bank's resolver learns it.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    let config = WorldConfig { in_doubt_timeout_ms: 1_000, ..WorldConfig::default() };
    let mut world = World::start(config).await?;
    let leader = world.leader().ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let txn = TxnId::new();
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    for branch in transfer_branches(250)? {
        prepare_directly(&world, txn, branch, deadline_unix_ms).await?;
    }
    stage(&world, leader, txn, &transfer_branches(100)?, true, deadline_unix_ms).await?;
    let record = decided(&world, leader, txn).await?;
    assert_eq!(record.decision, Decision::Abort, "{record:?}");
    wait_branch(&world, 0, txn, BranchState::Aborted).await?;
    wait_branch(&world, 1, txn, BranchState::Aborted).await?;
    // The history never had T: any money it moved is minted (I8).
    assert_invariants_hold(&mut world).await?;
    world.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_parallel_commit_answered_before_its_staged_entry() {
    // The checker bites (I8): a leader that answers Commit once the votes are
    // in, before its Staged entry is applied, tells clients Commit for txns a
    // leader change then settles as Abort (no Staged entry: presumed abort).
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    fail::cfg(coordinator_fp::PARALLEL_ANSWER_BEFORE_STAGED, "return").expect("a valid action");
    let found = sim::first_violation(FaultMix::Partitions, 40, |_| {}).await;
    let (seed, invariants) = found.expect("the simulation reports the broken protocol within 40 seeds");
    assert!(
        invariants.contains(&Invariant::I8) || invariants.contains(&Invariant::I2),
        "seed {seed} named {invariants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_coordinator_that_commits_despite_a_no_vote() {
    // The checker bites (I1 or I2, and I8): a leader that ignores NO votes
    // commits the other branch of overdrawn transfers (§5), or, under
    // parallel commit, tells the client Commit while the log, which refuses a
    // Commit carrying a NO (§13.1), ends with Abort.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    fail::cfg(coordinator_fp::PREPARE_IGNORE_VOTES, "return").expect("a valid action");
    let found = sim::first_violation(FaultMix::Calm, 5, |_| {}).await;
    let (seed, invariants) = found.expect("the simulation reports the broken protocol within 5 seeds");
    assert!(invariants.contains(&Invariant::I1) || invariants.contains(&Invariant::I2), "seed {seed}: {invariants:?}");
    assert!(invariants.contains(&Invariant::I8), "seed {seed} named {invariants:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_bank_that_releases_holds_on_a_timer() {
    // The checker bites (I4 broken, seen as I1 or I2): banks that abort
    // in-doubt branches on their own instead of asking the cluster disagree
    // with the logged Commit as soon as phase 2 is slow (I1); or, when status
    // recovery asks such a bank about a staged txn whose Commit was already
    // answered, its self-made abort reads as a NO and the log ends with Abort
    // (I2). Which comes first depends on timing (a real-time run).
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    fail::cfg(participant_fp::RESOLVE_RELEASE_ON_TIMER, "return").expect("a valid action");
    let found = sim::first_violation(FaultMix::Participants, 30, |_| {}).await;
    let (seed, invariants) = found.expect("the simulation reports the broken protocol within 30 seeds");
    assert!(invariants.contains(&Invariant::I1) || invariants.contains(&Invariant::I2), "seed {seed}: {invariants:?}");
}

fn decide(txn_id: TxnId) -> Proposal {
    let command = Command::Decide(DecideCmd {
        txn_id,
        decision: Decision::Abort,
        reason: String::new(),
        branches: Vec::new(),
        payload_digests: Vec::new(),
    });
    Proposal { command, proposed_unix_ms: twopc_proto::txn_id::unix_now_ms() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_rejected_at_apply_is_skipped_at_every_restart() -> anyhow::Result<()> {
    // §4.6: a removal of the last voter gets past the leader's check
    // (failpoint) into the log; raft-rs rejects it at apply. The caller is
    // told, and the node, replaying the entry at each restart, skips it again
    // instead of stopping on it.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_for_leader().await?;
    for id in cluster.running().into_iter().filter(|id| *id != leader) {
        cluster.node(leader).change_membership(Membership::Remove { id }).await?;
        cluster.kill(id).await?;
    }
    fail::cfg(coordinator_fp::MEMBERSHIP_SKIP_CHECK, "return").map_err(anyhow::Error::msg)?;
    let rejected = cluster.node(leader).change_membership(Membership::Remove { id: leader }).await;
    fail::remove(coordinator_fp::MEMBERSHIP_SKIP_CHECK);
    assert!(matches!(&rejected, Err(Error::FailedPrecondition(m)) if m.contains("rejected")), "{rejected:?}");
    for restart in 0..2 {
        cluster.kill(leader).await?;
        cluster.restart(leader).await?;
        assert_eq!(cluster.wait_for_leader().await?, leader, "restart {restart}: the last voter leads again");
        cluster.node(leader).propose(&decide(TxnId::new())).await?;
    }
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_applies_its_own_removal_hands_leadership_on() -> anyhow::Result<()> {
    // §4.6: the leader refuses to remove itself, but an earlier leader may
    // have logged the removal (here: the failpoint skips the check). The
    // removed leader hands leadership to a remaining voter at once and stops
    // leading; its raft task carries on. Without the hand-over the others
    // elect a leader only after a whole election timeout: the removed
    // leader's heartbeats hold their election timers back until check_quorum
    // deposes it.
    let _scenario = FailScenario::setup();
    twopc_tests::init_tracing();
    const TICK_MS: u64 = 30;
    const ELECTION_TICKS: usize = 50;
    let election_timeout = Duration::from_millis(TICK_MS * ELECTION_TICKS as u64);
    let mut cluster = Cluster::start_with(
        3,
        Box::new(|c| {
            c.tick_interval_ms = TICK_MS;
            c.election_ticks = ELECTION_TICKS;
        }),
    )
    .await?;
    let removed = cluster.wait_for_leader().await?;
    let remaining: Vec<u64> = cluster.running().into_iter().filter(|id| *id != removed).collect();
    fail::cfg(coordinator_fp::MEMBERSHIP_SKIP_CHECK, "return").map_err(anyhow::Error::msg)?;
    let removal = cluster.node(removed).change_membership(Membership::Remove { id: removed }).await;
    fail::remove(coordinator_fp::MEMBERSHIP_SKIP_CHECK);
    removal?;
    // raft-rs 0.7 would drop it ("proposal dropped"); the caller is sent to another node instead.
    let refused = cluster.node(removed).propose(&decide(TxnId::new())).await;
    assert!(matches!(refused, Err(Error::NotLeader { .. })), "{refused:?}");
    let new_leader = wait::until("a remaining voter to lead within an election timeout", election_timeout, || async {
        remaining.iter().copied().find(|id| {
            let status = cluster.node(*id).status();
            status.role == Role::Leader && status.leader_ready
        })
    })
    .await?;
    wait::until("the removed node to stop leading", SETTLE, || async {
        (cluster.node(removed).status().role != Role::Leader).then_some(())
    })
    .await?;
    cluster.node(new_leader).propose(&decide(TxnId::new())).await?;
    assert!(cluster.node(new_leader).status().peers.iter().all(|p| p.id != removed), "the removal was applied");
    cluster.kill(removed).await?;
    assert_eq!(cluster.wait_for_leader().await?, new_leader);
    cluster.stop().await
}

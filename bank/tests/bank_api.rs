//! The Bank gRPC API over real gRPC on 127.0.0.1:0, served on the same port
//! as the Participant service: create, balance, list, total, and each error
//! with its documented status code.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;
use twopc_bank::{BankConfig, BranchPayload, server};
use twopc_proto::TxnId;
use twopc_proto::pb::bank_client::BankClient;
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::pb::{self};
use twopc_proto::txn_id::unix_now_ms;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<twopc_bank::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // No coordinator is needed: nothing here is left in doubt.
        let config = BankConfig::new("bank-a".parse().expect("id"), vec!["127.0.0.1:9".into()], dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self { addr, stop: Some(stop), task, _dir: dir }
    }

    async fn bank(&self) -> BankClient<Channel> {
        BankClient::connect(format!("http://{}", self.addr)).await.expect("connect")
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("task").expect("bank ran cleanly");
    }
}

async fn create(bank: &mut BankClient<Channel>, account: &str, minor: i64) -> Result<pb::Account, tonic::Status> {
    let request = pb::CreateAccountRequest { account: account.into(), initial_balance_minor: minor };
    Ok(bank.create_account(request).await?.into_inner().account.expect("account"))
}

async fn balance(bank: &mut BankClient<Channel>, account: &str) -> Result<pb::Account, tonic::Status> {
    let request = pb::BalanceRequest { account: account.into() };
    Ok(bank.balance(request).await?.into_inner().account.expect("account"))
}

// Accounts are created with their opening balance, read back, listed in pages and totalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_balance_list_total() {
    let running = Running::start().await;
    let mut bank = running.bank().await;
    let created = create(&mut bank, "alice", 12_50).await.expect("create");
    assert_eq!((created.name.as_str(), created.balance_minor, created.available_minor), ("alice", 1250, 1250));
    for (account, minor) in [("bob", 0), ("carol", 300), ("dave", 1), ("erin", 2)] {
        create(&mut bank, account, minor).await.expect("create");
    }
    let alice = balance(&mut bank, "alice").await.expect("balance");
    assert_eq!((alice.balance_minor, alice.held_minor, alice.available_minor), (1250, 0, 1250));

    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page =
            bank.list_accounts(pb::ListAccountsRequest { page_size: 2, page_token }).await.expect("list").into_inner();
        assert!(page.accounts.len() <= 2);
        names.extend(page.accounts.into_iter().map(|a| a.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(names, ["alice", "bob", "carol", "dave", "erin"]);

    let total = bank.total(pb::TotalRequest {}).await.expect("total").into_inner();
    assert_eq!((total.balance_total_minor, total.held_total_minor, total.account_count), (1553, 0, 5));
    running.stop().await;
}

// Bad input is INVALID_ARGUMENT naming the field; unknown accounts NOT_FOUND; duplicates ALREADY_EXISTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_their_documented_codes() {
    let running = Running::start().await;
    let mut bank = running.bank().await;
    create(&mut bank, "alice", 100).await.expect("create");

    let duplicate = create(&mut bank, "alice", 5).await.expect_err("duplicate");
    assert_eq!(duplicate.code(), Code::AlreadyExists, "{duplicate:?}");
    assert_eq!(balance(&mut bank, "alice").await.expect("balance").balance_minor, 100);

    let unknown = balance(&mut bank, "zoe").await.expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("zoe"), "{unknown:?}");

    let negative = create(&mut bank, "bob", -1).await.expect_err("negative");
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert!(negative.message().starts_with("initial_balance_minor:"), "{negative:?}");

    for bad in ["", "Alice", "alice@bank-a", "a b"] {
        let status = balance(&mut bank, bad).await.expect_err("bad name");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().starts_with("account:"), "{status:?}");
    }
    let token = bank
        .list_accounts(pb::ListAccountsRequest { page_size: 0, page_token: "NOT A NAME".into() })
        .await
        .expect_err("bad token");
    assert_eq!(token.code(), Code::InvalidArgument);
    running.stop().await;
}

// One port: the Participant service answers beside the Bank API, and a prepared debit shows as held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_and_bank_share_the_port() {
    let running = Running::start().await;
    let mut bank = running.bank().await;
    create(&mut bank, "alice", 100).await.expect("create");
    let mut participant = ParticipantClient::connect(format!("http://{}", running.addr)).await.expect("connect");
    let txn = TxnId::new();
    let payload = BranchPayload::debit("alice".parse().expect("name"), 30).expect("payload");
    let vote = participant
        .prepare(pb::PrepareRequest {
            txn_id: txn.to_string(),
            participant: "bank-a".into(),
            payload: payload.encode(),
            deadline_unix_ms: unix_now_ms() + 10_000,
        })
        .await
        .expect("prepare")
        .into_inner();
    assert_eq!(vote.vote, pb::VoteKind::Yes as i32, "{vote:?}");
    let alice = balance(&mut bank, "alice").await.expect("balance");
    assert_eq!((alice.balance_minor, alice.held_minor, alice.available_minor), (100, 30, 70));
    participant
        .decide(pb::DecisionRequest {
            txn_id: txn.to_string(),
            participant: "bank-a".into(),
            decision: pb::Decision::Commit as i32,
        })
        .await
        .expect("decide");
    let alice = balance(&mut bank, "alice").await.expect("balance");
    assert_eq!((alice.balance_minor, alice.held_minor), (70, 0));
    running.stop().await;
}

// Restart: the bank closes its store when it stops, so the same data dir serves again with its balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_bank_restarts_on_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..2 {
        let config = BankConfig::new("bank-a".parse().expect("id"), vec!["127.0.0.1:9".into()], dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        let mut bank = BankClient::connect(format!("http://{addr}")).await.expect("connect");
        if round == 0 {
            create(&mut bank, "alice", 4_200).await.expect("create");
        }
        assert_eq!(balance(&mut bank, "alice").await.expect("balance").balance_minor, 4_200);
        drop(bank);
        let _ = stop.send(());
        task.await.expect("task").expect("bank ran cleanly");
    }
}

//! Helpers shared by the bank's integration tests.

#![allow(dead_code)]

use std::path::Path;

use twopc_bank::{AccountName, AccountStore, BranchPayload, RedbStore, StoreConfig};

/// An account name from a literal.
pub fn name(s: &str) -> AccountName {
    s.parse().expect("valid account name")
}

/// Opens (or reopens) the store at `dir`/bank.redb with default limits.
pub async fn open(dir: &Path) -> RedbStore {
    RedbStore::open(dir.join("bank.redb"), StoreConfig::default()).await.expect("open store")
}

/// Creates `account` with `minor` in `store`.
pub async fn create(store: &impl AccountStore, account: &str, minor: i64) {
    store.create_account(name(account), minor).await.expect("create account");
}

/// A one-operation debit payload.
pub fn debit(account: &str, minor: i64) -> BranchPayload {
    BranchPayload::debit(name(account), minor).expect("valid debit")
}

/// A one-operation credit payload.
pub fn credit(account: &str, minor: i64) -> BranchPayload {
    BranchPayload::credit(name(account), minor).expect("valid credit")
}

/// (balance, held, incoming) of `account`.
pub async fn row(store: &impl AccountStore, account: &str) -> (i64, i64, i64) {
    let a = store.account(name(account)).await.expect("account exists");
    (a.balance_minor, a.held_minor, a.incoming_minor)
}

/// A bank serving over `store` (any store) in the background on
/// 127.0.0.1:0, resolving with the coordinators at `coordinators`; stops
/// when dropped.
pub struct Serving {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<twopc_bank::Result<()>>,
}

impl Serving {
    pub async fn start<S: AccountStore>(store: std::sync::Arc<S>, coordinators: Vec<String>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = twopc_participant::ParticipantConfig::new("bank-a".parse().expect("id"), coordinators);
        config.resolve_backoff_min_ms = 5;
        config.resolve_backoff_max_ms = 20;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(twopc_bank::server::serve(listener, store, config, async move {
            let _ = stopped.await;
        }));
        Self { addr, stop: Some(stop), task }
    }

    pub async fn bank(&self) -> twopc_proto::pb::bank_client::BankClient<tonic::transport::Channel> {
        twopc_proto::pb::bank_client::BankClient::connect(format!("http://{}", self.addr)).await.expect("connect")
    }

    pub async fn participant(
        &self,
    ) -> twopc_proto::pb::participant_client::ParticipantClient<tonic::transport::Channel> {
        twopc_proto::pb::participant_client::ParticipantClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// Delivers `decision` for `txn` to the bank's Participant service.
    pub async fn decide(&self, txn: twopc_proto::TxnId, decision: twopc_proto::pb::Decision) {
        let request = twopc_proto::pb::DecisionRequest {
            txn_id: txn.to_string(),
            participant: "bank-a".into(),
            decision: decision as i32,
        };
        self.participant().await.decide(request).await.expect("decide");
    }

    /// Stops the bank and checks it ran cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("task").expect("the bank ran cleanly");
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A Debit or Credit call carrying `header` as its `twopc-txn` entry.
pub fn move_request(
    header: Option<&str>,
    account: &str,
    amount_minor: i64,
) -> tonic::Request<twopc_proto::pb::MoveRequest> {
    let mut request = tonic::Request::new(twopc_proto::pb::MoveRequest { account: account.into(), amount_minor });
    if let Some(value) = header {
        let value = value.parse().expect("an ASCII header value");
        request.metadata_mut().insert(twopc_proto::context::TXN_CONTEXT_METADATA_KEY, value);
    }
    request
}

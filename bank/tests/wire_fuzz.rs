//! The bank's wire boundary under arbitrary input (I6, docs/PROTOCOL.md §10):
//! a branch payload decodes any bytes to a value or an error, never a panic,
//! and a payload that encodes decodes to the same value; every Bank API
//! handler answers any request with a response or one of its documented
//! status codes (crate docs, "Status codes of the Bank API"), Debit and
//! Credit with any `twopc-txn` header values (absent, malformed, repeated,
//! any deadline) included, after which a branch is held exactly when the
//! coordinator logged its join and no balance has changed.

use std::sync::Arc;

use proptest::prelude::*;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Request};
use twopc_bank::{AccountStore, BankResource, BankService, BranchPayload, Operation, RedbStore, StoreConfig};
use twopc_participant::context::read_txn_context;
use twopc_participant::fake_coordinator::{FakeCoordinator, RunningFake};
use twopc_participant::{Participant, ParticipantConfig};
use twopc_proto::TxnId;
use twopc_proto::context::TXN_CONTEXT_METADATA_KEY;
use twopc_proto::pb::{self, bank_server::Bank as _};
use twopc_proto::txn_id::unix_now_ms;

fn account_name() -> impl Strategy<Value = String> {
    // Mostly valid names (so requests reach the store), sometimes anything.
    prop_oneof![3 => "[a-z0-9._-]{1,64}", 1 => ".{0,80}"]
}

fn operation() -> impl Strategy<Value = Operation> {
    ("[a-z0-9._-]{1,64}", 1..=i64::MAX, any::<bool>()).prop_map(|(name, amount_minor, debit)| {
        let account = name.parse().expect("the regex makes valid names");
        if debit { Operation::Debit { account, amount_minor } } else { Operation::Credit { account, amount_minor } }
    })
}

proptest! {
    #[test]
    fn a_payload_decodes_any_bytes_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = BranchPayload::decode(&bytes);
    }

    #[test]
    fn a_payload_round_trips(ops in proptest::collection::vec(operation(), 1..=twopc_bank::payload::OPS_PER_BRANCH_MAX)) {
        let payload = BranchPayload::new(ops).expect("1 to OPS_PER_BRANCH_MAX positive operations");
        prop_assert_eq!(BranchPayload::decode(&payload.encode()).expect("decodes"), payload);
    }
}

/// One request of the Bank API, any field values.
#[derive(Debug, Clone)]
enum BankCall {
    Create(pb::CreateAccountRequest),
    Balance(pb::BalanceRequest),
    List(pb::ListAccountsRequest),
}

fn bank_call() -> impl Strategy<Value = BankCall> {
    prop_oneof![
        (account_name(), any::<i64>()).prop_map(|(account, initial_balance_minor)| BankCall::Create(
            pb::CreateAccountRequest { account, initial_balance_minor }
        )),
        account_name().prop_map(|account| BankCall::Balance(pb::BalanceRequest { account })),
        (any::<u32>(), prop_oneof![Just(String::new()), account_name()])
            .prop_map(|(page_size, page_token)| BankCall::List(pb::ListAccountsRequest { page_size, page_token })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_bank_api_answers_any_request_with_a_documented_status(calls in proptest::collection::vec(bank_call(), 1..24)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = RedbStore::open(dir.path().join("bank.redb"), StoreConfig::default()).await.expect("store");
            let fake = FakeCoordinator::new();
            let node = fake.start().await.expect("fake coordinator");
            let service = service_over(Arc::new(store), &node).await;
            for call in calls {
                let answer = match call.clone() {
                    BankCall::Create(r) => service.create_account(Request::new(r)).await.map(drop),
                    BankCall::Balance(r) => service.balance(Request::new(r)).await.map(drop),
                    BankCall::List(r) => service.list_accounts(Request::new(r)).await.map(drop),
                };
                if let Err(status) = answer {
                    let documented = [Code::InvalidArgument, Code::NotFound, Code::AlreadyExists];
                    prop_assert!(documented.contains(&status.code()), "{call:?} answered {status:?}");
                    prop_assert!(!status.message().is_empty(), "{call:?}: a status without a reason");
                }
            }
            Ok(())
        })?;
    }
}

/// The Bank API over `store`, joining through a participant that asks the
/// fake coordinator at `node` (the participant itself need not serve).
async fn service_over(store: Arc<RedbStore>, node: &RunningFake) -> BankService<RedbStore> {
    let config = ParticipantConfig::new("bank-a".parse().expect("id"), vec![node.addr().to_string()]);
    let participant = Participant::new(Arc::new(BankResource::new(Arc::clone(&store))), config).expect("participant");
    BankService::new(store, participant.joiner())
}

/// A Debit or Credit with its `twopc-txn` header values.
#[derive(Debug, Clone)]
struct Move {
    debit: bool,
    header: Vec<Vec<u8>>,
    request: pb::MoveRequest,
}

fn header_value(known: Vec<TxnId>) -> impl Strategy<Value = Vec<u8>> {
    let now = unix_now_ms();
    let id = prop_oneof![
        4 => proptest::sample::select(known).prop_map(|id| id.to_string()),
        1 => Just(TxnId::new().to_string()),
        1 => "[0-9a-f-]{0,40}",
    ];
    let deadline = prop_oneof![
        4 => Just(now + 60_000),
        1 => Just(0u64),
        1 => Just(now.saturating_sub(1_000)),
        1 => any::<u64>(),
    ];
    prop_oneof![
        6 => (id.clone(), deadline).prop_map(|(id, d)| format!("{id};deadline={d}").into_bytes()),
        1 => (id, "[ ;=a-z0-9]{0,24}").prop_map(|(id, tail)| format!("{id}{tail}").into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..160),
    ]
}

fn a_move(known: Vec<TxnId>) -> impl Strategy<Value = Move> {
    let header = prop_oneof![
        1 => Just(Vec::new()),
        6 => header_value(known.clone()).prop_map(|v| vec![v]),
        1 => proptest::collection::vec(header_value(known), 2),
    ];
    let account = prop_oneof![4 => proptest::sample::select(vec!["alice", "bob", "zoe"]).prop_map(str::to_owned), 1 => account_name()];
    let amount = prop_oneof![4 => 1..=200i64, 1 => any::<i64>()];
    (any::<bool>(), header, account, amount).prop_map(|(debit, header, account, amount_minor)| Move {
        debit,
        header,
        request: pb::MoveRequest { account, amount_minor },
    })
}

/// The request as the server hands it to the handler: through the context
/// interceptor first. Values that cannot travel as a header are left out.
fn intercepted(call: &Move) -> Result<Request<pb::MoveRequest>, tonic::Status> {
    let mut request = Request::new(());
    for raw in &call.header {
        if let Ok(value) = AsciiMetadataValue::try_from(raw.as_slice()) {
            request.metadata_mut().append(TXN_CONTEXT_METADATA_KEY, value);
        }
    }
    let (metadata, extensions, ()) = read_txn_context(request)?.into_parts();
    Ok(Request::from_parts(metadata, extensions, call.request.clone()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn debit_and_credit_answer_any_context_with_a_documented_status(
        calls in {
            let known: Vec<TxnId> = (0..3).map(|_| TxnId::new()).collect();
            (Just(known.clone()), proptest::collection::vec(a_move(known), 1..16))
        }
    ) {
        let (known, calls) = calls;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Arc::new(RedbStore::open(dir.path().join("bank.redb"), StoreConfig::default()).await.expect("store"));
            store.create_account("alice".parse().expect("name"), 100).await.expect("alice");
            store.create_account("bob".parse().expect("name"), 0).await.expect("bob");
            let fake = FakeCoordinator::new();
            let node = fake.start().await.expect("fake coordinator");
            for txn in &known[..2] {
                fake.begin(*txn, unix_now_ms() + 60_000);
            }
            let service = service_over(Arc::clone(&store), &node).await;
            for call in calls {
                let answer = match intercepted(&call) {
                    Ok(request) if call.debit => service.debit(request).await.map(drop),
                    Ok(request) => service.credit(request).await.map(drop),
                    Err(status) => Err(status),
                };
                if let Err(status) = answer {
                    let documented = [Code::InvalidArgument, Code::FailedPrecondition];
                    prop_assert!(documented.contains(&status.code()), "{call:?} answered {status:?}");
                    prop_assert!(!status.message().is_empty(), "{call:?}: a status without a reason");
                }
            }
            // I4 and §12.3: a branch is held exactly when the coordinator logged its join.
            for txn in known {
                let held = store.branch_state(txn).await.expect("state") == Some(twopc_bank::BranchState::Prepared);
                prop_assert_eq!(held, fake.joined(txn) == vec!["bank-a".to_owned()], "txn {}", txn);
            }
            // I8: nothing was decided, so no balance moved.
            prop_assert_eq!(store.totals().await.expect("totals").balance_minor, 100);
            Ok(())
        })?;
    }
}

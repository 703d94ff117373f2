//! The bank's wire boundary under arbitrary input (I6, docs/PROTOCOL.md §10):
//! a branch payload decodes any bytes to a value or an error, never a panic,
//! and a payload that encodes decodes to the same value; every Bank API
//! handler answers any request with a response or one of its documented
//! status codes (crate docs, "Status codes of the Bank API").

use std::sync::Arc;

use proptest::prelude::*;
use tonic::{Code, Request};
use twopc_bank::{BankService, BranchPayload, Operation, RedbStore, StoreConfig};
use twopc_proto::pb::{self, bank_server::Bank as _};

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
            let service = BankService::new(Arc::new(store));
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

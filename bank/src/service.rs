//! The gRPC `twopc.v1.Bank` service: create accounts, read balances, list
//! accounts, total the bank. Handlers convert and check the wire request
//! first thing; bad input is `INVALID_ARGUMENT` with a message a person can
//! act on, an unknown account `NOT_FOUND`, a taken name `ALREADY_EXISTS`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use twopc_proto::pb::{self, bank_server};

use crate::address::AccountName;
use crate::error::{Error, Result};
use crate::money::format_minor;
use crate::store::{AccountBalance, AccountStore, Totals};

/// The page size of `ListAccounts` when the request gives none.
pub const LIST_PAGE_DEFAULT: usize = 100;
/// The largest page of `ListAccounts`; larger requests are lowered to it.
pub const LIST_PAGE_MAX: usize = 1000;

/// The Bank API over a store (shared with the participant's resource).
pub struct BankService<S> {
    store: Arc<S>,
}

impl<S: AccountStore> BankService<S> {
    /// The service over `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }
}

fn account_name(field: &'static str, text: &str) -> Result<AccountName> {
    text.parse().map_err(|e| Error::Invalid { field, why: format!("{e}") })
}

fn to_pb(account: AccountBalance) -> pb::Account {
    pb::Account {
        available_minor: account.available_minor(),
        name: account.name.into(),
        balance_minor: account.balance_minor,
        held_minor: account.held_minor,
        incoming_minor: account.incoming_minor,
    }
}

fn totals_to_pb(totals: Totals) -> Result<pb::TotalResponse> {
    let narrow = |what: &str, sum: i128| {
        i64::try_from(sum).map_err(|_| Error::Fatal(format!("the {what} total {sum} exceeds 64 bits")))
    };
    Ok(pb::TotalResponse {
        balance_total_minor: narrow("balance", totals.balance_minor)?,
        held_total_minor: narrow("held", totals.held_minor)?,
        incoming_total_minor: narrow("incoming", totals.incoming_minor)?,
        account_count: totals.accounts,
    })
}

#[tonic::async_trait]
impl<S: AccountStore> bank_server::Bank for BankService<S> {
    #[instrument(skip_all, fields(account = %request.get_ref().account))]
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let request = request.into_inner();
        let name = account_name("account", &request.account)?;
        let initial_minor = request.initial_balance_minor;
        if initial_minor < 0 {
            return Err(Error::Invalid {
                field: "initial_balance_minor",
                why: format!(
                    "{initial_minor} ({}) is negative; an account opens with 0 or more",
                    format_minor(initial_minor)
                ),
            }
            .into());
        }
        let account = self.store.create_account(name, initial_minor).await?;
        info!(initial_minor, "account created");
        Ok(Response::new(pb::CreateAccountResponse { account: Some(to_pb(account)) }))
    }

    #[instrument(skip_all, fields(account = %request.get_ref().account))]
    async fn balance(&self, request: Request<pb::BalanceRequest>) -> Result<Response<pb::BalanceResponse>, Status> {
        let name = account_name("account", &request.get_ref().account)?;
        let account = self.store.account(name).await?;
        Ok(Response::new(pb::BalanceResponse { account: Some(to_pb(account)) }))
    }

    #[instrument(skip_all)]
    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let request = request.into_inner();
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(account_name("page_token", token)?),
        };
        let limit = match request.page_size as usize {
            0 => LIST_PAGE_DEFAULT,
            n => n.min(LIST_PAGE_MAX),
        };
        let page = self.store.list_accounts(after, limit).await?;
        let next_page_token = match page.last() {
            Some(last) if page.len() == limit => last.name.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAccountsResponse { accounts: page.into_iter().map(to_pb).collect(), next_page_token }))
    }

    #[instrument(skip_all)]
    async fn total(&self, _request: Request<pb::TotalRequest>) -> Result<Response<pb::TotalResponse>, Status> {
        let totals = self.store.totals().await?;
        Ok(Response::new(totals_to_pb(totals)?))
    }
}

//! The gRPC `twopc.v1.Bank` service: create accounts, read balances, list
//! accounts, total the bank, and move funds inside interactive txns (Debit,
//! Credit; docs/PROTOCOL.md §12). Handlers convert and check the wire
//! request first thing; bad input is `INVALID_ARGUMENT` with a message a
//! person can act on, an unknown account `NOT_FOUND`, a taken name
//! `ALREADY_EXISTS`.
//!
//! Debit and Credit run only under a txn context (the `twopc-txn` metadata
//! entry, read by the participant library's interceptor, which
//! [`crate::server`] installs): each builds the branch a one-shot transfer
//! would carry ([`BranchPayload`]), prepares it durably and joins the txn
//! through the participant's [`Joiner`], so the hold (or the incoming
//! credit) is in place and logged before the caller hears OK.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Span, field, info, instrument};
use twopc_participant::Joiner;
use twopc_participant::context::require_txn_context;
use twopc_proto::pb::{self, bank_server};

use crate::address::AccountName;
use crate::error::{Error, Result};
use crate::money::format_minor;
use crate::payload::BranchPayload;
use crate::resource::BankResource;
use crate::store::{AccountBalance, AccountStore, Totals};

/// The page size of `ListAccounts` when the request gives none.
pub const LIST_PAGE_DEFAULT: usize = 100;
/// The largest page of `ListAccounts`; larger requests are lowered to it.
pub const LIST_PAGE_MAX: usize = 1000;

/// The Bank API over a store (shared with the participant's resource).
pub struct BankService<S> {
    store: Arc<S>,
    joiner: Joiner<BankResource<S>>,
}

/// Which way a Debit or Credit moves funds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    Debit,
    Credit,
}

impl<S: AccountStore> BankService<S> {
    /// The service over `store`, joining txns through `joiner` (the
    /// participant's, whose resource is a [`BankResource`] over the same
    /// store).
    pub fn new(store: Arc<S>, joiner: Joiner<BankResource<S>>) -> Self {
        Self { store, joiner }
    }

    /// Debit or Credit: context, then account and amount, then the branch
    /// is prepared and joined.
    async fn move_funds(&self, request: Request<pb::MoveRequest>, how: Move) -> Result<pb::MoveResponse, Status> {
        let call = match how {
            Move::Debit => "Debit",
            Move::Credit => "Credit",
        };
        let ctx = require_txn_context(&request, call)?;
        Span::current().record("txn_id", field::display(ctx.txn_id));
        let request = request.into_inner();
        let account = account_name("account", &request.account)?;
        let amount_minor = request.amount_minor;
        if amount_minor <= 0 {
            return Err(Error::Invalid {
                field: "amount_minor",
                why: format!("{amount_minor} is not more than 0; move a positive amount in minor units (cents)"),
            }
            .into());
        }
        let payload = match how {
            Move::Debit => BranchPayload::debit(account, amount_minor),
            Move::Credit => BranchPayload::credit(account, amount_minor),
        }
        .map_err(|e| Error::Invalid { field: "amount_minor", why: e.to_string() })?;
        // A NO vote (insufficient funds, unknown account) is FAILED_PRECONDITION
        // with the reason; a refused join names the txn's state.
        let joined = self.joiner.join(&ctx, payload.encode()).await.map_err(Error::from)?;
        info!(amount_minor, "branch prepared and joined");
        Ok(pb::MoveResponse { deadline_unix_ms: joined.deadline_unix_ms })
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

    #[instrument(skip_all, fields(account = %request.get_ref().account, txn_id = field::Empty))]
    async fn debit(&self, request: Request<pb::MoveRequest>) -> Result<Response<pb::MoveResponse>, Status> {
        Ok(Response::new(self.move_funds(request, Move::Debit).await?))
    }

    #[instrument(skip_all, fields(account = %request.get_ref().account, txn_id = field::Empty))]
    async fn credit(&self, request: Request<pb::MoveRequest>) -> Result<Response<pb::MoveResponse>, Status> {
        Ok(Response::new(self.move_funds(request, Move::Credit).await?))
    }
}

//! Building a transfer's branches: what a client submits to the coordinator
//! to move money from one account to another, across banks or within one.

use twopc_proto::{ParticipantId, pb};

use crate::address::AccountAddress;
use crate::error::{Error, Result};
use crate::money::format_minor;
use crate::payload::{BranchPayload, Operation};

/// A checked transfer of `amount_minor` from one account to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    from: AccountAddress,
    to: AccountAddress,
    amount_minor: i64,
}

impl Transfer {
    /// A transfer of `amount_minor` (positive) from `from` to `to`.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the amount is not positive or both sides are
    /// the same account.
    pub fn new(from: AccountAddress, to: AccountAddress, amount_minor: i64) -> Result<Self> {
        if amount_minor <= 0 {
            return Err(Error::Invalid {
                field: "amount",
                why: format!("{} is not positive; give an amount of at least 0.01", format_minor(amount_minor)),
            });
        }
        if from == to {
            return Err(Error::Invalid {
                field: "to",
                why: format!("{to} is also the payer; a transfer needs two different accounts"),
            });
        }
        Ok(Self { from, to, amount_minor })
    }

    /// The paying account.
    pub fn from(&self) -> &AccountAddress {
        &self.from
    }

    /// The paid account.
    pub fn to(&self) -> &AccountAddress {
        &self.to
    }

    /// The amount in minor units.
    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    /// One branch per bank: a debit at the payer's bank and a credit at the
    /// payee's, or a single branch with both when they are the same bank (a
    /// txn has at most one branch per participant).
    pub fn branches(&self) -> Vec<(ParticipantId, BranchPayload)> {
        let debit = Operation::Debit { account: self.from.account.clone(), amount_minor: self.amount_minor };
        let credit = Operation::Credit { account: self.to.account.clone(), amount_minor: self.amount_minor };
        let payload = |ops| BranchPayload::new(ops).expect("checked in Transfer::new");
        if self.from.bank == self.to.bank {
            return vec![(self.from.bank.clone(), payload(vec![debit, credit]))];
        }
        vec![(self.from.bank.clone(), payload(vec![debit])), (self.to.bank.clone(), payload(vec![credit]))]
    }

    /// [`Transfer::branches`] as the coordinator's `Submit` wants them.
    pub fn submit_branches(&self) -> Vec<pb::Branch> {
        self.branches()
            .into_iter()
            .map(|(bank, payload)| pb::Branch { participant: bank.to_string(), payload: payload.encode() })
            .collect()
    }
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} from {} to {}", format_minor(self.amount_minor), self.from, self.to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(s: &str) -> AccountAddress {
        s.parse().expect("valid address")
    }

    // A cross-bank transfer is a debit branch at the payer's bank and a credit branch at the payee's.
    #[test]
    fn cross_bank_transfer_has_a_branch_per_bank() {
        let t = Transfer::new(address("alice@bank-a"), address("bob@bank-b"), 1250).expect("ok");
        let branches = t.branches();
        assert_eq!(branches.len(), 2);
        assert_eq!(branches[0].0.as_str(), "bank-a");
        assert_eq!(branches[0].1.to_string(), "debit alice 12.50");
        assert_eq!(branches[1].0.as_str(), "bank-b");
        assert_eq!(branches[1].1.to_string(), "credit bob 12.50");
        let wire = t.submit_branches();
        assert_eq!(BranchPayload::decode(&wire[1].payload).expect("decodes"), branches[1].1);
    }

    // The coordinator allows one branch per participant, so a same-bank transfer is one branch.
    #[test]
    fn same_bank_transfer_is_one_branch() {
        let t = Transfer::new(address("alice@bank-a"), address("bob@bank-a"), 5).expect("ok");
        let branches = t.branches();
        assert_eq!(branches.len(), 1);
        assert_eq!(branches[0].1.to_string(), "debit alice 0.05, credit bob 0.05");
    }

    // Bad transfers are refused before anything is submitted.
    #[test]
    fn bad_transfers_are_refused() {
        let (a, b) = (address("alice@bank-a"), address("bob@bank-b"));
        for amount in [0, -1] {
            assert!(matches!(Transfer::new(a.clone(), b.clone(), amount), Err(Error::Invalid { field: "amount", .. })));
        }
        assert!(matches!(Transfer::new(a.clone(), a, 100), Err(Error::Invalid { field: "to", .. })));
    }
}

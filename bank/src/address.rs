//! Account names and addresses: `alice` is an account, `alice@bank-a` is
//! account `alice` at the bank whose participant id is `bank-a`.

use std::fmt;
use std::str::FromStr;

use twopc_proto::ParticipantId;
use twopc_proto::participant_id::ParticipantIdError;

/// The longest account name accepted, in bytes.
pub const ACCOUNT_NAME_MAX_BYTES: usize = 64;

/// An account's name within its bank, such as `alice`: 1 to 64 characters
/// of lowercase ASCII letters, digits, `.`, `_` and `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName(String);

/// Why text is not a valid [`AccountName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account name {name:?} is invalid: {why}")]
pub struct AccountNameError {
    name: String,
    why: &'static str,
}

impl AccountName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AccountName {
    type Err = AccountNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why| Err(AccountNameError { name: s.chars().take(80).collect(), why });
        if s.is_empty() {
            return fail("it is empty; use a name such as alice");
        }
        if s.len() > ACCOUNT_NAME_MAX_BYTES {
            return fail("it is longer than 64 characters");
        }
        if s.contains('@') {
            return fail("give the account name alone (alice), not an address (alice@bank-a)");
        }
        if s.chars().any(|c| c.is_ascii_uppercase()) {
            return fail("uppercase letters are not allowed; use lowercase");
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
        if !s.chars().all(allowed) {
            return fail("only lowercase letters, digits, '.', '_' and '-' are allowed");
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for AccountName {
    type Error = AccountNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<AccountName> for String {
    fn from(name: AccountName) -> Self {
        name.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountName({})", self.0)
    }
}

/// An account at a bank, written `alice@bank-a`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountAddress {
    /// The account within its bank.
    pub account: AccountName,
    /// The bank: its participant id.
    pub bank: ParticipantId,
}

/// Why text is not a valid [`AccountAddress`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No `@`, or more than one.
    #[error("{text:?} is not an account address; write ACCOUNT@BANK, such as alice@bank-a")]
    Malformed {
        /// The text as given (shortened).
        text: String,
    },
    /// The part before `@` is not a valid account name.
    #[error("{0}")]
    Account(#[from] AccountNameError),
    /// The part after `@` is not a valid bank (participant) name.
    #[error("bank of {text:?}: {source}")]
    Bank {
        /// The text as given (shortened).
        text: String,
        /// What is wrong with the bank name.
        source: ParticipantIdError,
    },
}

impl AccountAddress {
    /// The address of `account` at `bank`.
    pub fn new(account: AccountName, bank: ParticipantId) -> Self {
        Self { account, bank }
    }
}

impl FromStr for AccountAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = || s.chars().take(80).collect::<String>();
        let Some((account, bank)) = s.split_once('@') else {
            return Err(AddressError::Malformed { text: text() });
        };
        if bank.contains('@') {
            return Err(AddressError::Malformed { text: text() });
        }
        let account = account.parse()?;
        let bank = bank.parse().map_err(|source| AddressError::Bank { text: text(), source })?;
        Ok(Self { account, bank })
    }
}

impl fmt::Display for AccountAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.account, self.bank)
    }
}

impl fmt::Debug for AccountAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountAddress({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Account names follow the documented alphabet and length, with a reason on refusal.
    #[test]
    fn account_names_are_validated() {
        for ok in ["alice", "a", "bob.smith", "acct_1", "x-9", "0", &"a".repeat(64)] {
            assert!(ok.parse::<AccountName>().is_ok(), "{ok}");
        }
        let cases = [
            ("", "empty"),
            (&*"a".repeat(65), "longer than 64"),
            ("Alice", "uppercase"),
            ("al ice", "only lowercase"),
            ("al/ice", "only lowercase"),
            ("élan", "only lowercase"),
            ("alice@bank-a", "not an address"),
        ];
        for (bad, why) in cases {
            let message = bad.parse::<AccountName>().map_err(|e| e.to_string());
            assert!(message.as_ref().is_err_and(|m| m.contains(why)), "{bad:?}: {message:?}");
        }
    }

    // Addresses split into account and bank, and print back the same way.
    #[test]
    fn addresses_parse_and_print() {
        let address: AccountAddress = "alice@bank-a".parse().expect("valid");
        assert_eq!(address.account.as_str(), "alice");
        assert_eq!(address.bank.as_str(), "bank-a");
        assert_eq!(address.to_string(), "alice@bank-a");
    }

    // Each kind of bad address gets its own clear error.
    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for malformed in ["alice", "alice@b@c", ""] {
            assert!(matches!(malformed.parse::<AccountAddress>(), Err(AddressError::Malformed { .. })));
        }
        assert!(matches!("@bank-a".parse::<AccountAddress>(), Err(AddressError::Account(_))));
        assert!(matches!("Alice@bank-a".parse::<AccountAddress>(), Err(AddressError::Account(_))));
        for bad_bank in ["alice@", "alice@Bank", "alice@bank a"] {
            assert!(matches!(bad_bank.parse::<AccountAddress>(), Err(AddressError::Bank { .. })));
        }
        let message = "alice".parse::<AccountAddress>().map_err(|e| e.to_string());
        assert_eq!(
            message,
            Err("\"alice\" is not an account address; write ACCOUNT@BANK, such as alice@bank-a".into())
        );
    }
}

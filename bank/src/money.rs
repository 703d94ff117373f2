//! Money as integers in minor units (cents): parsing decimal text such as
//! `12.50` into minor units and formatting minor units back. No floats
//! anywhere, so nothing is ever rounded.

use std::fmt::Write as _;

/// Minor units in one major unit: amounts have two decimals.
pub const MINOR_PER_UNIT: i64 = 100;

/// The most decimals an amount may have.
pub const DECIMALS: usize = 2;

/// Why text is not an acceptable amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Nothing was given.
    #[error("the amount is empty; give a number such as 12.50")]
    Empty,
    /// Not a decimal number.
    #[error(
        "{text:?} is not an amount; use digits with an optional point and up to 2 decimals, \
         such as 12.50"
    )]
    Malformed {
        /// The text as given (shortened).
        text: String,
    },
    /// More than [`DECIMALS`] digits after the point.
    #[error("{text:?} has more than 2 decimals; the smallest amount is 0.01")]
    TooManyDecimals {
        /// The text as given (shortened).
        text: String,
    },
    /// Does not fit in 64 bits of minor units.
    #[error("{text:?} is too large; the largest amount is {max}", max = format_minor(i64::MAX))]
    Overflow {
        /// The text as given (shortened).
        text: String,
    },
    /// A minus sign: amounts and balances are never negative.
    #[error("{text:?} is negative; give an amount of at least 0.01")]
    Negative {
        /// The text as given (shortened).
        text: String,
    },
    /// Zero where a positive amount is needed (a transfer of nothing).
    #[error("{text:?} is zero; give an amount of at least 0.01")]
    Zero {
        /// The text as given (shortened).
        text: String,
    },
}

/// Parses a transfer amount: positive, at most two decimals. `"12.50"`,
/// `"12.5"` and `"12"` are accepted; surrounding whitespace is ignored.
///
/// # Errors
/// A [`MoneyError`] saying what is wrong: empty, malformed, too many
/// decimals, too large, negative or zero.
pub fn parse_amount(text: &str) -> Result<i64, MoneyError> {
    let minor = parse_balance(text)?;
    if minor == 0 {
        return Err(MoneyError::Zero { text: shortened(text) });
    }
    Ok(minor)
}

/// Parses a balance such as an account's opening balance: like
/// [`parse_amount`], but zero is allowed.
///
/// # Errors
/// A [`MoneyError`] saying what is wrong: empty, malformed, too many
/// decimals, too large or negative.
pub fn parse_balance(text: &str) -> Result<i64, MoneyError> {
    let trimmed = text.trim();
    let shortened = || shortened(trimmed);
    if trimmed.is_empty() {
        return Err(MoneyError::Empty);
    }
    if trimmed.starts_with('-') {
        return Err(MoneyError::Negative { text: shortened() });
    }
    let (whole, fraction) = match trimmed.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (trimmed, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || fraction.is_some_and(|f| !all_digits(f)) {
        return Err(MoneyError::Malformed { text: shortened() });
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > DECIMALS {
        return Err(MoneyError::TooManyDecimals { text: shortened() });
    }
    let overflow = || MoneyError::Overflow { text: shortened() };
    let whole: i64 = whole.parse().map_err(|_| overflow())?;
    // Pad "5" to "50": the fraction is in hundredths.
    let cents = format!("{fraction:0<width$}", width = DECIMALS)
        .parse::<i64>()
        .map_err(|_| MoneyError::Malformed { text: shortened() })?;
    whole.checked_mul(MINOR_PER_UNIT).and_then(|minor| minor.checked_add(cents)).ok_or_else(overflow)
}

/// Formats minor units as a decimal with two places: `1250` is `"12.50"`,
/// `-5` is `"-0.05"`.
pub fn format_minor(minor: i64) -> String {
    let magnitude = minor.unsigned_abs();
    let unit = MINOR_PER_UNIT.unsigned_abs();
    let mut text = String::with_capacity(24);
    if minor < 0 {
        text.push('-');
    }
    // Writing to a String cannot fail.
    let _ = write!(text, "{}.{:02}", magnitude / unit, magnitude % unit);
    text
}

/// Error messages quote at most this many characters of the input.
const QUOTED_MAX_CHARS: usize = 40;

fn shortened(text: &str) -> String {
    text.chars().take(QUOTED_MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Amounts round-trip between text and minor units exactly.
    #[test]
    fn parses_and_formats_exactly() {
        let cases = [
            ("12.50", 1250),
            ("12.5", 1250),
            ("12", 1200),
            ("0.05", 5),
            ("0.5", 50),
            (" 7.00 ", 700),
            ("0012.01", 1201),
        ];
        for (text, minor) in cases {
            assert_eq!(parse_amount(text), Ok(minor), "{text}");
        }
        assert_eq!(format_minor(1250), "12.50");
        assert_eq!(format_minor(5), "0.05");
        assert_eq!(format_minor(0), "0.00");
        assert_eq!(format_minor(-5), "-0.05");
        assert_eq!(format_minor(-1250), "-12.50");
        assert_eq!(format_minor(i64::MIN), "-92233720368547758.08");
        for minor in [0, 1, 99, 100, 101, 123_456_789, i64::MAX] {
            assert_eq!(parse_balance(&format_minor(minor)), Ok(minor));
        }
    }

    // Bad amounts are refused with an error naming the problem, never rounded.
    #[test]
    fn rejects_bad_amounts_with_the_reason() {
        assert_eq!(parse_amount(""), Err(MoneyError::Empty));
        assert_eq!(parse_amount("   "), Err(MoneyError::Empty));
        for malformed in ["abc", "1,5", "1.2.3", ".5", "5.", "+5", "1e3", "12 50", "١٢", "0x10", "NaN"] {
            assert!(
                matches!(parse_amount(malformed), Err(MoneyError::Malformed { .. })),
                "{malformed}: {:?}",
                parse_amount(malformed)
            );
        }
        for decimals in ["0.001", "12.505", "1.000"] {
            assert!(matches!(parse_amount(decimals), Err(MoneyError::TooManyDecimals { .. })));
        }
        for negative in ["-1", "-0.01", "-0"] {
            assert!(matches!(parse_amount(negative), Err(MoneyError::Negative { .. })));
        }
        for zero in ["0", "0.00", "0.0", "000"] {
            assert!(matches!(parse_amount(zero), Err(MoneyError::Zero { .. })));
            assert_eq!(parse_balance(zero), Ok(0));
        }
        for huge in ["92233720368547758.08", "92233720368547759", "99999999999999999999999"] {
            assert!(matches!(parse_amount(huge), Err(MoneyError::Overflow { .. })));
        }
        assert_eq!(parse_amount("92233720368547758.07"), Ok(i64::MAX));
    }

    // Messages are actionable: they quote the input and say what to give instead.
    #[test]
    fn messages_quote_the_input_and_the_fix() {
        let message = parse_amount("1.234").map_err(|e| e.to_string());
        assert_eq!(message, Err("\"1.234\" has more than 2 decimals; the smallest amount is 0.01".into()));
        let long = "9".repeat(500);
        let message = parse_amount(&long).map_err(|e| e.to_string());
        assert!(message.is_err_and(|m| m.len() < 200));
    }
}

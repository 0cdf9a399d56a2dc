//! Redaction of payment-card numbers in loaded text.
//!
//! A store's sales export can carry free text (a note, a loyalty field) where a cashier once
//! typed a card number. Fedmesh never lets such a value reach feature extraction: every loaded
//! field passes through [`redact_card_numbers`] first.
//!
//! A card number here is a run of 13 to 19 digits, optionally split into groups by single
//! spaces or dashes, that passes the Luhn check. The run must stand alone: a digit, a letter, a
//! `.` or a `,` right before or after it means it is part of something else (a decimal such as
//! `0.2328647339745751` is a price or a share, not a card).

/// What replaces a redacted card number.
pub const REDACTED: &str = "[REDACTED]";

/// Shortest and longest card numbers, in digits (ISO/IEC 7812).
const MIN_DIGITS: usize = 13;
const MAX_DIGITS: usize = 19;

/// Returns `text` with every card-looking number replaced by [`REDACTED`], and how many were
/// replaced.
///
/// Borrowing when nothing matches keeps the common case (numbers and short codes) free of
/// allocations.
pub fn redact_card_numbers(text: &str) -> (std::borrow::Cow<'_, str>, usize) {
    let bytes = text.as_bytes();
    if bytes.iter().filter(|b| b.is_ascii_digit()).count() < MIN_DIGITS {
        return (std::borrow::Cow::Borrowed(text), 0);
    }

    let mut out = String::with_capacity(text.len());
    let mut count = 0;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let starts_run = bytes[i].is_ascii_digit() && (i == 0 || !is_attached(bytes[i - 1]));
        if !starts_run {
            i += 1;
            continue;
        }
        let end = card_run_end(bytes, i);
        let stands_alone = end == bytes.len() || !is_attached(bytes[end]);
        if stands_alone {
            for (from, to) in card_spans(bytes, i, end) {
                out.push_str(&text[copied..from]);
                out.push_str(REDACTED);
                copied = to;
                count += 1;
            }
        }
        i = end.max(i + 1);
    }

    if count == 0 {
        return (std::borrow::Cow::Borrowed(text), 0);
    }
    out.push_str(&text[copied..]);
    (std::borrow::Cow::Owned(out), count)
}

/// The card numbers inside the digit run `bytes[start..end]`, as byte ranges in order.
///
/// A card may share its run with other digit groups ("4111 1111 1111 1111 12/25" runs on into
/// the expiry month), so every span of whole groups is a candidate: from each group, the
/// longest span of 13-19 digits that passes the Luhn check is taken.
fn card_spans(bytes: &[u8], start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut i = start;
    while i < end {
        let from = i;
        while i < end && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if from < i {
            groups.push((from, i));
        }
        // Skip the single separator between groups.
        i += 1;
    }

    let mut spans = Vec::new();
    let mut first = 0;
    while first < groups.len() {
        let mut digits = Vec::new();
        let mut longest = None;
        for (last, &(from, to)) in groups.iter().enumerate().skip(first) {
            digits.extend(bytes[from..to].iter().map(|b| b - b'0'));
            if digits.len() > MAX_DIGITS {
                break;
            }
            if digits.len() >= MIN_DIGITS && luhn_valid(&digits) {
                longest = Some(last);
            }
        }
        match longest {
            Some(last) => {
                spans.push((groups[first].0, groups[last].1));
                first = last + 1;
            }
            None => first += 1,
        }
    }
    spans
}

/// Whether the Luhn checksum of `digits` (most significant first, values 0-9) is valid.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(position, &d)| {
            let d = u32::from(d);
            if position % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// Characters that make a digit run part of a larger token.
fn is_attached(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.'
}

/// End (exclusive) of the run of digit groups starting at `start`: digits, with single spaces
/// or dashes allowed only between two digits.
fn card_run_end(bytes: &[u8], start: usize) -> usize {
    let mut end = start;
    let mut i = start;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_digit() {
            i += 1;
            end = i;
        } else if (b == b' ' || b == b'-') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i += 1;
        } else {
            break;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_known_test_numbers() {
        // 4111 1111 1111 1111 is the well-known Visa test number.
        let digits: Vec<u8> = "4111111111111111".bytes().map(|b| b - b'0').collect();
        assert!(luhn_valid(&digits));
        let digits: Vec<u8> = "4111111111111112".bytes().map(|b| b - b'0').collect();
        assert!(!luhn_valid(&digits));
    }

    #[test]
    fn card_followed_or_preceded_by_other_digit_groups_is_still_redacted() {
        // The 18- and 17-digit runs fail Luhn as a whole; the 16-digit card inside passes.
        let (out, n) = redact_card_numbers("paid 4111111111111111 12/25");
        assert_eq!((out.as_ref(), n), ("paid [REDACTED] 12/25", 1));
        let (out, n) = redact_card_numbers("lane 2 4111-1111-1111-1111");
        assert_eq!((out.as_ref(), n), ("lane 2 [REDACTED]", 1));
        // Digit groups that hold no Luhn-valid span are left alone.
        let (out, n) = redact_card_numbers("order 1234 5678 9012 3456 7");
        assert_eq!((out.as_ref(), n), ("order 1234 5678 9012 3456 7", 0));
    }
}

//! Local metrics against hand computations.

use fedmesh_store_agent::eval::{accuracy, expected_calibration_error, mae, rmse};
use fedmesh_store_agent::redact::redact_card_numbers;

#[test]
fn regression_metrics_match_hand_computation() {
    // Errors 1, -2, 0, 1: squares 1 + 4 + 0 + 1 = 6, RMSE sqrt(6 / 4); absolute 4 / 4 = 1.
    let predictions = [2.0, 1.0, 3.0, 5.0];
    let targets = [1.0, 3.0, 3.0, 4.0];
    assert!((rmse(&predictions, &targets) - 1.5f64.sqrt()).abs() < 1e-12);
    assert!((mae(&predictions, &targets) - 1.0).abs() < 1e-12);
}

#[test]
fn calibration_error_matches_hand_computation() {
    // Four rows, two classes. Confidences 0.9 (right), 0.8 (wrong), 0.58 (right), 0.55 (wrong).
    // 15 bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11 or 12, 0.58 and 0.55 -> bin 8
    // (8/15 = 0.533 < both <= 9/15 = 0.6).
    // ECE = 1/4 |1 - 0.9| + 1/4 |0 - 0.8| + 2/4 |1/2 - 0.565| = 0.025 + 0.2 + 0.0325 = 0.2575.
    let probs = [0.9, 0.1, 0.2, 0.8, 0.42, 0.58, 0.55, 0.45];
    let labels = [0, 0, 1, 1];
    assert!((accuracy(&probs, 2, &labels) - 0.5).abs() < 1e-12);
    let ece = expected_calibration_error(&probs, 2, &labels, 15);
    assert!((ece - 0.2575).abs() < 1e-6, "{ece}");
}

#[test]
fn redaction_counts_only_luhn_valid_card_numbers() {
    // 4111 1111 1111 1111 (Visa test), 378282246310005 (Amex test, 15 digits) and
    // 6011-1111-1111-1117 (Discover test) pass Luhn; 1234567890123 (13 digits) does not.
    let text =
        "paid 4111 1111 1111 1111, then 378282246310005; ref 1234567890123 / 6011-1111-1111-1117";
    let (redacted, count) = redact_card_numbers(text);
    assert_eq!(count, 3);
    assert_eq!(
        redacted,
        "paid [REDACTED], then [REDACTED]; ref 1234567890123 / [REDACTED]"
    );

    // Decimals and short codes are never cards, even with many digits.
    for kept in [
        "0.2328647339745751",
        "37.9923255813953",
        "4111111111111112",
        "411111111111",
    ] {
        assert_eq!(redact_card_numbers(kept), (kept.into(), 0), "{kept}");
    }
}

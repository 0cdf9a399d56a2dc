//! Bit-packing: round trips at every width, the documented bit order, and rejection of
//! values that do not fit, truncated streams and nonzero padding.

use fedmesh_protocol::codec::bitpack::{BitpackError, pack, packed_len, unpack};
use proptest::prelude::*;

/// Values of up to 64 bits together with a width wide enough for all of them.
fn values_and_width() -> impl Strategy<Value = (Vec<u64>, u32)> {
    (1u32..=64).prop_flat_map(|bits| {
        let max = u64::MAX >> (64 - bits);
        (prop::collection::vec(0..=max, 0..200), Just(bits))
    })
}

proptest! {
    #[test]
    fn unpack_returns_what_pack_packed((values, bits) in values_and_width()) {
        let packed = pack(&values, bits).unwrap();
        prop_assert_eq!(packed.len(), (values.len() * bits as usize).div_ceil(8));
        prop_assert_eq!(unpack(&packed, bits, values.len()).unwrap(), values);
    }

    #[test]
    fn packed_stream_is_one_little_endian_bit_string((values, bits) in values_and_width()) {
        // Reference: read bit j of the stream as bit j % 8 of byte j / 8, one bit at a time.
        let packed = pack(&values, bits).unwrap();
        for (i, &value) in values.iter().enumerate() {
            let mut read = 0u64;
            for b in 0..bits as usize {
                let j = i * bits as usize + b;
                read |= u64::from((packed[j / 8] >> (j % 8)) & 1) << b;
            }
            prop_assert_eq!(read, value);
        }
    }

    #[test]
    fn truncated_or_extended_streams_are_rejected(
        (values, bits) in values_and_width(),
        cut in 1usize..9,
    ) {
        let packed = pack(&values, bits).unwrap();
        if packed.len() >= cut {
            let short = unpack(&packed[..packed.len() - cut], bits, values.len());
            let is_length_error = matches!(short, Err(BitpackError::Length { .. }));
            prop_assert!(is_length_error);
        }
        let mut long = packed.clone();
        long.push(0);
        let is_length_error =
            matches!(unpack(&long, bits, values.len()), Err(BitpackError::Length { .. }));
        prop_assert!(is_length_error);
    }

    #[test]
    fn unpacking_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        bits in 0u32..70,
        count in 0usize..1000,
    ) {
        // Any outcome is fine as long as it is a value or an error, never a panic.
        let _ = unpack(&bytes, bits, count);
    }
}

#[test]
fn rejects_value_wider_than_the_width() {
    // 12 bits hold at most 4095, so 4096 at index 1 must be refused.
    let err = pack(&[7, 4096, 1], 12).unwrap_err();
    assert_eq!(
        err,
        BitpackError::ValueTooWide {
            index: 1,
            value: 4096,
            bits: 12
        }
    );
}

#[test]
fn rejects_width_outside_one_to_sixty_four() {
    assert_eq!(
        pack(&[0], 0).unwrap_err(),
        BitpackError::BitWidth { bits: 0 }
    );
    assert_eq!(
        pack(&[0], 65).unwrap_err(),
        BitpackError::BitWidth { bits: 65 }
    );
    assert_eq!(
        unpack(&[], 65, 0).unwrap_err(),
        BitpackError::BitWidth { bits: 65 }
    );
}

#[test]
fn rejects_nonzero_padding() {
    // Three 3-bit values use 9 bits, so bits 1..8 of the second byte are padding.
    let mut packed = pack(&[1, 2, 3], 3).unwrap();
    assert_eq!(packed.len(), 2);
    packed[1] |= 0b10;
    assert_eq!(
        unpack(&packed, 3, 3).unwrap_err(),
        BitpackError::NonzeroPadding
    );
}

#[test]
fn rejects_count_whose_length_overflows() {
    let err = unpack(&[], 64, usize::MAX).unwrap_err();
    assert_eq!(
        err,
        BitpackError::CountOverflow {
            count: usize::MAX,
            bits: 64
        }
    );
    assert!(packed_len(usize::MAX / 2, 64).is_err());
}

#[test]
fn full_width_values_round_trip() {
    let values = [u64::MAX, 0, 1 << 63, 0x0123_4567_89ab_cdef];
    let packed = pack(&values, 64).unwrap();
    // At 64 bits the stream is the values' little-endian bytes laid end to end.
    let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(packed, expected);
    assert_eq!(unpack(&packed, 64, values.len()).unwrap(), values);
}

#[test]
fn packs_least_significant_bit_first() {
    // 3-bit values 0b101, 0b011, 0b110 at bit offsets 0, 3 and 6. Byte 0, written high bit
    // first, is [low 2 bits of 0b110][0b011][0b101] = 0b10_011_101 = 0x9D; byte 1 holds the
    // remaining high bit of 0b110, so it is 0x01.
    let packed = pack(&[0b101, 0b011, 0b110], 3).unwrap();
    assert_eq!(packed, vec![0x9D, 0x01]);
    assert_eq!(unpack(&packed, 3, 3).unwrap(), vec![0b101, 0b011, 0b110]);
}

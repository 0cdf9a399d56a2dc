//! Mask expansion: a ChaCha20 keystream (RFC 8439, zero nonce), keyed with a full 256-bit
//! secret, read as ring elements.
//!
//! Each element takes the smallest whole number of bytes that covers the ring (2, 4 or 8)
//! and keeps its low `r` bits; since 2^r divides 2^16, 2^32 and 2^64, the low bits of a
//! uniform word are uniform in the ring. Sums are kept modulo 2^64 and reduced once at the
//! end, which is the same as reducing at every step.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::{ChaCha20, Key, Nonce};

/// Keystream bytes drawn per refill; large enough to amortise the generator's overhead.
const BLOCK: usize = 16 * 1024;

/// Adds (or, with `negate`, subtracts) the mask expanded from `key` to `acc`, modulo 2^64.
/// The caller reduces modulo 2^r afterwards.
pub(crate) fn apply_mask(acc: &mut [u64], key: &[u8; 32], negate: bool, ring_bits: u32) {
    let width = element_bytes(ring_bits);
    // Each key seeds one stream only, so the all-zero nonce is never reused with it.
    let mut stream = ChaCha20::new(Key::from_slice(key), Nonce::from_slice(&[0u8; 12]));
    let mut buf = vec![0u8; BLOCK];
    for chunk in acc.chunks_mut(BLOCK / width) {
        let bytes = &mut buf[..chunk.len() * width];
        // XOR onto zeros leaves the keystream itself.
        bytes.fill(0);
        stream.apply_keystream(bytes);
        match width {
            2 => combine(chunk, bytes.chunks_exact(2), negate, |b| {
                u64::from(u16::from_le_bytes([b[0], b[1]]))
            }),
            4 => combine(chunk, bytes.chunks_exact(4), negate, |b| {
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }),
            _ => combine(chunk, bytes.chunks_exact(8), negate, |b| {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                u64::from_le_bytes(w)
            }),
        }
    }
}

fn combine<'a>(
    acc: &mut [u64],
    words: impl Iterator<Item = &'a [u8]>,
    negate: bool,
    read: impl Fn(&[u8]) -> u64,
) {
    if negate {
        for (a, w) in acc.iter_mut().zip(words) {
            *a = a.wrapping_sub(read(w));
        }
    } else {
        for (a, w) in acc.iter_mut().zip(words) {
            *a = a.wrapping_add(read(w));
        }
    }
}

/// Bytes of keystream per ring element.
fn element_bytes(ring_bits: u32) -> usize {
    match ring_bits {
        0..=16 => 2,
        17..=32 => 4,
        _ => 8,
    }
}

/// Reduces every element modulo 2^r.
pub(crate) fn reduce(acc: &mut [u64], ring_bits: u32) {
    let mask = ring_mask(ring_bits);
    for a in acc.iter_mut() {
        *a &= mask;
    }
}

/// 2^r - 1.
pub(crate) fn ring_mask(ring_bits: u32) -> u64 {
    if ring_bits >= 64 {
        u64::MAX
    } else {
        (1u64 << ring_bits) - 1
    }
}

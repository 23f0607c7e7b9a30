//! Philox4x32-10, the counter-based generator of Salmon, Moraes, Dror and
//! Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3" (SC'11), as in
//! D. E. Shaw Research's Random123.
//!
//! A pure function of a 128-bit counter and a 64-bit key: no state, so each
//! element of a tensor can draw its own numbers on any thread (or GPU
//! thread) and get the same bits. The kernels implement the same rounds.
//!
//! It lives beside dropout, its only user so far; if initializers or data
//! shuffling come to need it, it moves to a crate-level `rng` module
//! unchanged (a one-line re-export keeps this path working).

/// Multiplier applied to counter word 0 in each round.
pub const M0: u32 = 0xD251_1F53;
/// Multiplier applied to counter word 2 in each round.
pub const M1: u32 = 0xCD9E_8D57;
/// Weyl increment of key word 0 between rounds (golden ratio).
pub const W0: u32 = 0x9E37_79B9;
/// Weyl increment of key word 1 between rounds (sqrt(3) - 1).
pub const W1: u32 = 0xBB67_AE85;
/// Rounds (the Crush-resistant variant with a safety margin).
pub const ROUNDS: usize = 10;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(M0, c[0]);
    let (hi1, lo1) = mulhilo(M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds: the first round uses `key` as given, and the
/// key is bumped by (`W0`, `W1`) (wrapping) before each later round.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    c = round(c, k);
    for _ in 1..ROUNDS {
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        c = round(c, k);
    }
    c
}

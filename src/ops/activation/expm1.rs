//! `exp(x) - 1` for `x <= 0` in straight-line f32 arithmetic (no libm call,
//! no branch), so that a loop over it vectorizes: elu's negative side.
//!
//! Method: `x = n ln 2 + r` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`
//! (Cody-Waite: `ln 2` split in a 16-bit head, so `n * LN2_HI` is exact for
//! `|n| < 2^8`, and a tail); `expm1(r)` by its Taylor polynomial to `r^8`
//! (the first term left out, `r^9 / 9!`, is under `6e-10 |r|`), evaluated as
//! `r + r^2 q(r)` so that a tiny `r` comes out as `r` itself, exactly; then
//! `expm1(x) = 2^n expm1(r) + (2^n - 1)`, where both the scaling and
//! `2^n - 1` are exact in f32 for `-24 <= n <= 0` and the sum rounds once.
//! Below `x = -87` the input is clamped there (the result is -1 to f32
//! precision from `x < -17.4` on) so that `2^n` stays a normal number.
//!
//! Accuracy against f64 `exp_m1`: at most 0.85 ulp of the f32 result,
//! measured over every f32 in `[-87, 0]` once (2026-12-03, a throwaway
//! loop over all 1.1e9 inputs: worst 0.8495 ulp at -0.36386895);
//! `tests/activation.rs` keeps checking [`EXPM1_MAX_ULP`] over every 61st
//! f32 there, every power of two down to the smallest subnormal, and the
//! inputs around each range-reduction boundary. Only multiplies, adds and
//! integer bit moves, never a fused multiply-add, so the bits are the same
//! at every vector width and instruction set.

/// The largest error of [`expm1_nonpositive`], in units in the last place
/// of the correctly rounded f32 result (see the module docs for how it is
/// measured).
pub const EXPM1_MAX_ULP: u32 = 1;

/// `ln 2` to 16 bits (0x3F317200): `n * LN2_HI` is exact for `|n| < 2^8`.
const LN2_HI: f32 = 0.693_145_75;
/// `ln 2 - LN2_HI` (0x35BFBE8E).
const LN2_LO: f32 = 1.428_606_8e-6;
/// `1 / ln 2`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `1.5 * 2^23`: adding it rounds a float of magnitude under `2^22` to an
/// integer (ties to even) held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Inputs below this are clamped to it: `2^-126` is the smallest normal
/// `2^n`, and `expm1(-87)` is -1 in f32.
const LOWEST: f32 = -87.0;

/// `exp(x) - 1` for `x <= 0` (and `-inf`, giving -1) within
/// [`EXPM1_MAX_ULP`] ulp; a NaN or a positive `x` is outside the domain
/// (the result is then unspecified; elu never passes one).
#[inline(always)]
pub fn expm1_nonpositive(x: f32) -> f32 {
    let x = if x < LOWEST { LOWEST } else { x };
    // n = round(x / ln 2) as a float and as an integer, from the same sum.
    let t = x * LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let n_int = t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients 1/2! .. 1/8!.
    let q = 1.0 / 40_320.0f32;
    let q = q * r + 1.0 / 5_040.0;
    let q = q * r + 1.0 / 720.0;
    let q = q * r + 1.0 / 120.0;
    let q = q * r + 1.0 / 24.0;
    let q = q * r + 1.0 / 6.0;
    let q = q * r + 0.5;
    let em1_r = r + (r * r) * q;
    // 2^n from its exponent bits (n >= -126 after the clamp).
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    scale * em1_r + (scale - 1.0)
}

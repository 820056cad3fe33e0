//! Scalar math written so that a loop over it vectorizes: `exp` without branches or table lookups, the erf
//! behind GELU, dtype widening, and reductions with a fixed lane layout (16 partial sums, then a fixed
//! tree), which the compiler may map onto SIMD registers without reassociating anything. Each slice
//! function is compiled per ISA through `simd_dispatch!` and gives the same bits on each.
//!
//! Accuracy: `exp_f32` is within 2 ulp over its whole range (gradual underflow included); GELU evaluates
//! erfc from a Chebyshev fit with fractional error below 1.2e-7 (Press et al., Numerical Recipes §6.2) and
//! stays within 3.5e-7 relative everywhere, negative tail included, which is tighter than the erf
//! torch vectorizes on the CPU (whose `1 + erf` cancels in that tail).

use half::{bf16, f16};

use super::simd_dispatch;

/// Number of partial sums in reductions: 16 f32 fill one AVX-512 register or two AVX2 registers.
const LANES: usize = 16;

/// `e^x` in f32. Round-to-nearest range reduction `x = n ln2 + r` (Cody-Waite split of ln2), degree-7
/// Taylor polynomial of `e^r` on |r| <= ln2/2 (truncation 5e-9), and `2^n` applied in two halves so that
/// neither factor leaves the normal range: results round once into subnormals or infinity. `n` is read
/// from the bits of the rounding sum, since float-to-int conversions do not vectorize everywhere.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    exp_parts(x, 0.0)
}

/// `e^(x + lo)` for an argument carried as a head `x` and a tail `lo` below ulp(x): the tail joins the
/// reduced argument, so its bits are not lost to the rounding of `x + lo`.
#[inline(always)]
fn exp_parts(x: f32, lo: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer (ties to even)
    const LN2_HI: f32 = 355.0 / 512.0; // 9 significant bits: n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4_f32;
    // Below -110 the result is 0 and above 89 it is infinite; clamping keeps n in exponent range.
    let xc = x.clamp(-110.0, 89.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = ((xc - n * LN2_HI) - n * LN2_LO) + lo;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let e1 = ni >> 1;
    let e2 = ni - e1;
    let s1 = f32::from_bits(((e1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((e2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Exact GELU, `x/2 (1 + erf(x/√2))`. With `a = |x|/√2`, `erfc(a) = t e^(P(t) - a²)`, `t = 1/(1 + a/2)`,
/// and `1 + erf` is `2 - erfc(a)` for x >= 0 and `erfc(a)` for x < 0, so the negative tail keeps its
/// relative accuracy. `t`, `P(t)` and the exponent are formed in f64 (`a² = x²/2` is exact there), whose
/// single rounding is then carried into the f32 `exp` as a head and a tail: the exponent reaches -200, and
/// rounding it to f32 would cost up to 200·2^-24 relative error.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    // Beyond |x| = 20, erfc(|x|/√2) < 1e-88: the result is x or zero, whatever the clamped value gives.
    let xc = x.clamp(-20.0, 20.0) as f64;
    let a = xc.abs() * std::f64::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let arg = poly - 0.5 * xc * xc;
    let hi = arg as f32;
    let lo = (arg - hi as f64) as f32;
    let erfc = t as f32 * exp_parts(hi, lo);
    let one_plus_erf = if xc >= 0.0 { 2.0 - erfc } else { erfc };
    x * 0.5 * one_plus_erf
}

/// SiLU as torch computes it: `x / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

#[inline(always)]
fn gelu_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu(*v);
    }
}
simd_dispatch!(pub(crate) fn gelu_slice(x: &mut [f32]) => gelu_body);

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}
simd_dispatch!(pub(crate) fn silu_mul_slice(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_body);

#[inline(always)]
fn add_body(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}
simd_dispatch!(pub(crate) fn add_slice(acc: &mut [f32], x: &[f32]) => add_body);

#[inline(always)]
fn add_scaled_body(acc: &mut [f32], x: &[f32], scale: &[f32]) {
    for ((a, &v), &s) in acc.iter_mut().zip(x).zip(scale) {
        *a += s * v;
    }
}
simd_dispatch!(pub(crate) fn add_scaled_slice(acc: &mut [f32], x: &[f32], scale: &[f32]) => add_scaled_body);

#[inline(always)]
fn widen_bf16_body(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}
simd_dispatch!(pub(crate) fn widen_bf16(src: &[bf16], dst: &mut [f32]) => widen_bf16_body);

pub(crate) fn widen_f16(src: &[f16], dst: &mut [f32]) {
    // half converts with F16C/NEON when the CPU has it.
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
}

/// Sum of squares and sum in f64 with a fixed lane layout (for the norms).
#[inline(always)]
fn sum_and_sq_body(x: &[f32]) -> (f64, f64) {
    let mut s = [0f64; 8];
    let mut q = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let v = c[l] as f64;
            s[l] += v;
            q[l] += v * v;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        s[l] += v as f64;
        q[l] += (v as f64) * (v as f64);
    }
    (tree8(s), tree8(q))
}
simd_dispatch!(pub(crate) fn sum_and_sq(x: &[f32]) -> (f64, f64) => sum_and_sq_body);

/// Sum of `(x - mean)^2` in f64 (LayerNorm's variance, two-pass for accuracy at large offsets).
#[inline(always)]
fn centered_sq_body(x: &[f32], mean: f64) -> f64 {
    let mut q = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let d = c[l] as f64 - mean;
            q[l] += d * d;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        let d = v as f64 - mean;
        q[l] += d * d;
    }
    tree8(q)
}
simd_dispatch!(pub(crate) fn centered_sq(x: &[f32], mean: f64) -> f64 => centered_sq_body);

#[inline(always)]
fn tree8(v: [f64; 8]) -> f64 {
    ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
}

#[inline(always)]
fn tree16(v: [f32; LANES]) -> f32 {
    let mut h = [0f32; 8];
    for l in 0..8 {
        h[l] = v[l] + v[l + 8];
    }
    ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
}

/// `Σ a[i] b[i]` in f32 with 16 partial sums.
#[inline(always)]
pub(crate) fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for l in 0..ta.len() {
        acc[l] += ta[l] * tb[l];
    }
    tree16(acc)
}
simd_dispatch!(pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 => dot_body);

/// `acc += w * x` (compiled into the callers' dispatched loops).
#[inline(always)]
pub(crate) fn axpy_body(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// In-place softmax of one row as torch computes it: `e^(x - max)`, the f32 sum, then a multiply by the
/// reciprocal of the sum. A row of -inf only (no visible key) cannot occur in attention and gives NaN.
#[inline(always)]
pub(crate) fn softmax_body(x: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            mx[l] = mx[l].max(c[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        mx[l] = mx[l].max(v);
    }
    let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp_f32(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        let e = exp_f32(*v - m);
        *v = e;
        acc[l] += e;
    }
    let inv = 1.0 / tree16(acc);
    for v in x.iter_mut() {
        *v *= inv;
    }
}
simd_dispatch!(pub(crate) fn softmax_row(x: &mut [f32]) => softmax_body);

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_diff(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn exp_f32_within_two_ulp() {
        let mut worst = (0, 0.0f32);
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp() as f32;
            let d = ulp_diff(exp_f32(x), want);
            if d > worst.0 && want.is_normal() {
                worst = (d, x);
            }
            x += 0.000_731;
        }
        assert!(worst.0 <= 2, "exp_f32 off by {} ulp at x = {}", worst.0, worst.1);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        // Subnormal results are rounded once, not flushed.
        let sub = exp_f32(-100.0);
        assert!(sub > 0.0 && ulp_diff(sub, (-100f64).exp() as f32) <= 1, "{sub:e}");
    }

    #[test]
    fn gelu_matches_erf_definition() {
        let mut worst = (0f64, 0f32);
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let want = 0.5 * xd * one_plus_erf_reference(xd * std::f64::consts::FRAC_1_SQRT_2);
            let got = gelu(x) as f64;
            let err = (got - want).abs() / want.abs().max(1e-30);
            if err > worst.0 && want.abs() > 1e-30 {
                worst = (err, x);
            }
            x += 0.000_37;
        }
        assert!(worst.0 < 3.5e-7, "gelu relative error {:e} at x = {}", worst.0, worst.1);
    }

    /// `1 + erf(z)` in f64 from the Maclaurin series of erf (|z| < 3) or the continued fraction of erfc
    /// (beyond), taking erfc directly for negative z: slow but independent of the approximation under test.
    fn one_plus_erf_reference(z: f64) -> f64 {
        let a = z.abs();
        let erfc = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            let mut n = 0.0;
            while term.abs() > 1e-18 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            1.0 - sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..200).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        if z < 0.0 {
            erfc
        } else {
            2.0 - erfc
        }
    }

    #[test]
    fn reductions_do_not_depend_on_isa_path() {
        let x: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1000) as f32 * 0.001 - 0.5).collect();
        let y: Vec<f32> = (0..1037).map(|i| ((i * 104_729) % 997) as f32 * 0.002 - 1.0).collect();
        assert_eq!(dot(&x, &y).to_bits(), dot_body(&x, &y).to_bits());
        let (mut a, mut b) = (x.clone(), x.clone());
        softmax_row(&mut a);
        softmax_body(&mut b);
        assert_eq!(a, b);
        let (mut a, mut b) = (y.clone(), y.clone());
        gelu_slice(&mut a);
        gelu_body(&mut b);
        assert_eq!(a, b);
    }
}

//! The "ISLOW" integer inverse DCT of libjpeg (Loeffler-Ligtenberg-Moschytz, 13-bit constants, 2 extra bits
//! between passes), libjpeg-turbo's default method. Any other IDCT (zune-jpeg's, a float one) differs from it by
//! a level here and there, and those differences survive the bicubic resize; this one is bit-exact for valid data.

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

const FIX_0_298631336: i32 = 2446;
const FIX_0_390180644: i32 = 3196;
const FIX_0_541196100: i32 = 4433;
const FIX_0_765366865: i32 = 6270;
const FIX_0_899976223: i32 = 7373;
const FIX_1_175875602: i32 = 9633;
const FIX_1_501321110: i32 = 12299;
const FIX_1_847759065: i32 = 15137;
const FIX_1_961570560: i32 = 16069;
const FIX_2_053119869: i32 = 16819;
const FIX_2_562915447: i32 = 20995;
const FIX_3_072711026: i32 = 25172;

#[inline(always)]
fn descale(x: i32, n: u32) -> i32 {
    x.wrapping_add(1 << (n - 1)) >> n
}

/// Samples beyond 0..=255 saturate (libjpeg-turbo's SIMD IDCT saturates too; its C table only differs for
/// values more than 384 out of range, which valid data cannot produce).
#[inline(always)]
fn clamp_sample(x: i32) -> u8 {
    (x + 128).clamp(0, 255) as u8
}

/// One 1-D pass of the even/odd butterfly on 8 values `v[0..8]`, returning the 8 outputs before descaling.
#[inline(always)]
fn butterfly(v: [i32; 8]) -> [i32; 8] {
    let z2 = v[2];
    let z3 = v[6];
    let z1 = (z2 + z3).wrapping_mul(FIX_0_541196100);
    let tmp2 = z1.wrapping_add(z3.wrapping_mul(-FIX_1_847759065));
    let tmp3 = z1.wrapping_add(z2.wrapping_mul(FIX_0_765366865));

    let tmp0 = (v[0].wrapping_add(v[4])).wrapping_shl(CONST_BITS);
    let tmp1 = (v[0].wrapping_sub(v[4])).wrapping_shl(CONST_BITS);

    let tmp10 = tmp0.wrapping_add(tmp3);
    let tmp13 = tmp0.wrapping_sub(tmp3);
    let tmp11 = tmp1.wrapping_add(tmp2);
    let tmp12 = tmp1.wrapping_sub(tmp2);

    let t0 = v[7];
    let t1 = v[5];
    let t2 = v[3];
    let t3 = v[1];

    let z1 = t0.wrapping_add(t3);
    let z2 = t1.wrapping_add(t2);
    let z3 = t0.wrapping_add(t2);
    let z4 = t1.wrapping_add(t3);
    let z5 = (z3.wrapping_add(z4)).wrapping_mul(FIX_1_175875602);

    let t0 = t0.wrapping_mul(FIX_0_298631336);
    let t1 = t1.wrapping_mul(FIX_2_053119869);
    let t2 = t2.wrapping_mul(FIX_3_072711026);
    let t3 = t3.wrapping_mul(FIX_1_501321110);
    let z1 = z1.wrapping_mul(-FIX_0_899976223);
    let z2 = z2.wrapping_mul(-FIX_2_562915447);
    let z3 = z3.wrapping_mul(-FIX_1_961570560).wrapping_add(z5);
    let z4 = z4.wrapping_mul(-FIX_0_390180644).wrapping_add(z5);

    let t0 = t0.wrapping_add(z1).wrapping_add(z3);
    let t1 = t1.wrapping_add(z2).wrapping_add(z4);
    let t2 = t2.wrapping_add(z2).wrapping_add(z3);
    let t3 = t3.wrapping_add(z1).wrapping_add(z4);

    [
        tmp10.wrapping_add(t3),
        tmp11.wrapping_add(t2),
        tmp12.wrapping_add(t1),
        tmp13.wrapping_add(t0),
        tmp13.wrapping_sub(t0),
        tmp12.wrapping_sub(t1),
        tmp11.wrapping_sub(t2),
        tmp10.wrapping_sub(t3),
    ]
}

/// Dequantizes and inverse-transforms one block (coefficients in natural order) into 8 rows of `out` at `stride`.
/// `quant` holds the table as libjpeg stores it: 16-bit signed multipliers.
pub(super) fn idct_islow(coef: &[i16], quant: &[i16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i32; 64];
    // Pass 1: columns. A column whose AC terms are all zero yields its DC on all rows (same as the full math).
    for c in 0..8 {
        let dq = |r: usize| coef[r * 8 + c] as i32 * quant[r * 8 + c] as i32;
        if (1..8).all(|r| coef[r * 8 + c] == 0) {
            let dc = dq(0).wrapping_shl(PASS1_BITS);
            for r in 0..8 {
                ws[r * 8 + c] = dc;
            }
            continue;
        }
        let o = butterfly([dq(0), dq(1), dq(2), dq(3), dq(4), dq(5), dq(6), dq(7)]);
        for r in 0..8 {
            ws[r * 8 + c] = descale(o[r], CONST_BITS - PASS1_BITS);
        }
    }
    // Pass 2: rows, descaled by the pass-1 extra bits and the 8x gain of the 2-D transform.
    for r in 0..8 {
        let row: [i32; 8] = ws[r * 8..r * 8 + 8].try_into().unwrap_or([0; 8]);
        let dst = &mut out[r * stride..r * stride + 8];
        if row[1..].iter().all(|&v| v == 0) {
            let v = clamp_sample(descale(row[0], PASS1_BITS + 3));
            dst.fill(v);
            continue;
        }
        let o = butterfly(row);
        for i in 0..8 {
            dst[i] = clamp_sample(descale(o[i], CONST_BITS + PASS1_BITS + 3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dc_only_block_is_flat() {
        let mut coef = [0i16; 64];
        coef[0] = 80; // DC of 80 * quant 2 = 160 -> mean offset 160 / 8 = 20 -> sample 148
        let quant = [2i16; 64];
        let mut out = [0u8; 64];
        idct_islow(&coef, &quant, &mut out, 8);
        assert!(out.iter().all(|&v| v == 148), "{out:?}");
    }

    #[test]
    fn saturates_out_of_range() {
        let mut coef = [0i16; 64];
        coef[0] = 2000;
        let quant = [16i16; 64];
        let mut out = [0u8; 64];
        idct_islow(&coef, &quant, &mut out, 8);
        assert!(out.iter().all(|&v| v == 255));
    }
}

//! Matrix-vector kernels for `linear` with a handful of input rows (decode): each weight row is read once
//! from memory in its stored dtype, widened to f32 in registers and dotted with every input row, four at a
//! time, while it sits in L1. Decode is bound by weight bandwidth, so a bf16 checkpoint moves half the bytes of f32.
//!
//! A tile holds `R` weight rows against `M` input rows in `M * R` vector accumulators; `R` shrinks as `M`
//! grows so the accumulators, the `M` input vectors and one weight vector fit the register file (32 zmm
//! with AVX-512, 16 ymm with AVX2). Several rows per tile also give the FMA units independent chains.
//! Without AVX2 each row is widened into a scratch buffer and dotted with `math::dot`.

use half::{bf16, f16};

use super::{math, Isa};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A weight element type: f32, bf16 or f16.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The slice itself when it already is f32 (no widening copy needed).
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    /// 8 elements at `p` as f32. Caller: AVX2 + F16C enabled, 8 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
    /// 16 elements at `p` as f32. Caller: AVX-512F enabled, 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn widen(src: &[bf16], dst: &mut [f32]) {
        math::widen_bf16(src, dst);
    }
    // bf16 is the top half of an f32: zero-extend each u16 to 32 bits and shift it up.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn widen(src: &[f16], dst: &mut [f32]) {
        math::widen_f16(src, dst);
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// Rows of weights handled together by the outer loop; their bytes stay in L1/L2 while every group of
/// four input rows is dotted with them.
const GROUP: usize = 8;

/// `out[r * m + i] = Σ_t x[i * k + t] · w[r * k + t]` for every row `r` of `w` (`w.len() / k` rows) and
/// every input row `i < m`. Output is row-major by weight row, so that a block of rows owns a contiguous
/// slice of it.
pub(crate) fn gemv_rows<W: Elem>(isa: Isa, x: &[f32], m: usize, k: usize, w: &[W], out: &mut [f32]) {
    let rows = w.len().checked_div(k).unwrap_or(out.len() / m.max(1));
    assert!(x.len() == m * k && w.len() == rows * k && out.len() == rows * m, "gemv_rows: slice sizes");
    if k == 0 {
        out.fill(0.0);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time; the sizes were checked above.
        Isa::Avx512 => unsafe { avx512::rows(x.as_ptr(), m, k, w.as_ptr(), rows, out.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2::rows(x.as_ptr(), m, k, w.as_ptr(), rows, out.as_mut_ptr()) },
        _ => base_rows(x, m, k, w, rows, out),
    }
}

fn base_rows<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], rows: usize, out: &mut [f32]) {
    let mut row = vec![0f32; k];
    for r in 0..rows {
        W::widen(&w[r * k..(r + 1) * k], &mut row);
        for i in 0..m {
            out[r * m + i] = math::dot(&x[i * k..(i + 1) * k], &row);
        }
    }
}

/// Generates the tile loop for one vector width. `$r` maps the number of input rows `M` to the number of
/// weight rows `R` per tile (a divisor of `GROUP`).
#[cfg(target_arch = "x86_64")]
macro_rules! gemv_isa {
    ($modname:ident, $features:literal, $vec:ty, $lanes:literal, $zero:ident, $loadx:ident, $loadw:ident,
     $fma:ident, $hsum:path, [$r1:literal, $r2:literal, $r3:literal, $r4:literal]) => {
        mod $modname {
            use super::*;

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows<W: Elem>(
                x: *const f32,
                m: usize,
                k: usize,
                w: *const W,
                rows: usize,
                out: *mut f32,
            ) {
                let mut r0 = 0;
                while r0 < rows {
                    let full = rows - r0 >= GROUP;
                    let mut i0 = 0;
                    while i0 < m {
                        let mm = (m - i0).min(4);
                        let xs = x.add(i0 * k);
                        let o = out.add(r0 * m + i0);
                        let wg = w.add(r0 * k);
                        if full {
                            match mm {
                                1 => group::<W, 1, $r1>(xs, k, wg, o, m),
                                2 => group::<W, 2, $r2>(xs, k, wg, o, m),
                                3 => group::<W, 3, $r3>(xs, k, wg, o, m),
                                _ => group::<W, 4, $r4>(xs, k, wg, o, m),
                            }
                        } else {
                            for r in 0..rows - r0 {
                                let (wr, or) = (wg.add(r * k), o.add(r * m));
                                match mm {
                                    1 => tile::<W, 1, 1>(xs, k, wr, or, m),
                                    2 => tile::<W, 2, 1>(xs, k, wr, or, m),
                                    3 => tile::<W, 3, 1>(xs, k, wr, or, m),
                                    _ => tile::<W, 4, 1>(xs, k, wr, or, m),
                                }
                            }
                        }
                        i0 += mm;
                    }
                    r0 += GROUP;
                }
            }

            #[target_feature(enable = $features)]
            unsafe fn group<W: Elem, const M: usize, const R: usize>(
                x: *const f32,
                k: usize,
                w: *const W,
                out: *mut f32,
                m: usize,
            ) {
                let mut r = 0;
                while r < GROUP {
                    tile::<W, M, R>(x, k, w.add(r * k), out.add(r * m), m);
                    r += R;
                }
            }

            /// `R` weight rows at `w` against `M` input rows at `x`; `out[r * m + i]`.
            #[target_feature(enable = $features)]
            unsafe fn tile<W: Elem, const M: usize, const R: usize>(
                x: *const f32,
                k: usize,
                w: *const W,
                out: *mut f32,
                m: usize,
            ) {
                let kv = k - k % $lanes;
                let mut acc: [[$vec; R]; M] = [[$zero(); R]; M];
                let mut t = 0;
                while t < kv {
                    let mut xv: [$vec; M] = [$zero(); M];
                    for i in 0..M {
                        xv[i] = $loadx(x.add(i * k + t));
                    }
                    for r in 0..R {
                        let wv = W::$loadw(w.add(r * k + t));
                        for i in 0..M {
                            acc[i][r] = $fma(wv, xv[i], acc[i][r]);
                        }
                    }
                    t += $lanes;
                }
                for i in 0..M {
                    for r in 0..R {
                        let mut s = $hsum(acc[i][r]);
                        for t in kv..k {
                            s += *x.add(i * k + t) * (*w.add(r * k + t)).to_f32();
                        }
                        *out.add(r * m + i) = s;
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum512(v: __m512) -> f32 {
    let s =
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    hsum256(s)
}

#[cfg(target_arch = "x86_64")]
gemv_isa!(
    avx512,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    load16,
    _mm512_fmadd_ps,
    hsum512,
    [8, 8, 8, 4]
);

#[cfg(target_arch = "x86_64")]
gemv_isa!(
    avx2,
    "avx2,fma,f16c",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    load8,
    _mm256_fmadd_ps,
    hsum256,
    [8, 4, 2, 2]
);

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], rows: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * m];
        for r in 0..rows {
            for i in 0..m {
                out[r * m + i] = (0..k).map(|t| x[i * k + t] as f64 * w[r * k + t] as f64).sum();
            }
        }
        out
    }

    /// Every ISA path this CPU has, every M, full and partial row groups, k with and without a tail.
    #[test]
    fn every_isa_path_matches_f64() {
        let mut isas = vec![Isa::Base];
        if super::super::isa() >= Isa::Avx2 {
            isas.push(Isa::Avx2);
        }
        if super::super::isa() >= Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        for &(m, k, rows) in &[(1, 64, 8), (1, 19, 3), (2, 37, 11), (3, 100, 17), (4, 129, 9), (7, 33, 24), (5, 16, 1)]
        {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let wf: Vec<f32> = (0..rows * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let (rf, rb, rh) =
                (reference(&x, m, k, &wf, rows), reference(&x, m, k, &wbf, rows), reference(&x, m, k, &whf, rows));
            for &isa in &isas {
                let mut out = vec![0f32; rows * m];
                let check = |out: &[f32], want: &[f64], what: &str| {
                    for (j, (&g, &e)) in out.iter().zip(want).enumerate() {
                        assert!(
                            (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{isa:?} {what} m={m} k={k} rows={rows} at {j}: {g} vs {e}"
                        );
                    }
                };
                gemv_rows(isa, &x, m, k, &wf, &mut out);
                check(&out, &rf, "f32");
                gemv_rows(isa, &x, m, k, &wb, &mut out);
                check(&out, &rb, "bf16");
                gemv_rows(isa, &x, m, k, &wh, &mut out);
                check(&out, &rh, "f16");
            }
        }
    }
}

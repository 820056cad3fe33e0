//! Antialiased bicubic resize of uint8 image planes, reproducing what
//! `torchvision.transforms.v2.functional.resize(uint8 tensor, BICUBIC, antialias=True)` runs on CPU: aten's
//! separable uint8 path (`_upsample_bicubic2d_aa`, a port of Pillow's ImagingResample). The facts it relies on:
//!
//! * filter: Keys cubic with a = -0.5; support 2 input pixels, widened to 2*scale when downscaling (scale =
//!   in/out as f64), where taps are evaluated at (x - center + 0.5) / scale;
//! * taps of output i: center = scale * (i + 0.5), xmin = max(trunc(center - support + 0.5), 0),
//!   xmax = min(trunc(center + support + 0.5), in); weights normalized to sum 1 in f64;
//! * weights quantized to i16 with one precision per axis: the largest p <= 22 such that
//!   round(max_weight * 2^(p+1)) < 2^15, each weight rounded half away from zero at 2^p;
//! * horizontal pass first (skipped when the width is unchanged), rounded and clamped to uint8, then the vertical
//!   pass: acc = 2^(p-1) + sum(w * pixel) in i32, result clamp(acc >> p, 0, 255).
//!
//! The AVX2 kernel and the generic fallback of aten share this arithmetic, so the result does not depend on the
//! CPU; the fixtures (PNG inputs, which decode exactly) confirm it bit for bit. Integer sums are exact, so the
//! order of accumulation here is free.

use rayon::prelude::*;

/// Per-output-pixel taps of one axis.
pub(crate) struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    /// `ksize` weights per output pixel, zero-padded.
    weights: Vec<i16>,
    ksize: usize,
    precision: u32,
}

#[inline]
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

impl Taps {
    pub(crate) fn new(input: usize, output: usize) -> Taps {
        let scale = input as f64 / output as f64;
        let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let ksize = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(output);
        let mut len = Vec::with_capacity(output);
        let mut wf = vec![0f64; output * ksize];
        let mut wmax = 0f64;
        for i in 0..output {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(input as i64);
            let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let w = &mut wf[i * ksize..i * ksize + n];
            let mut total = 0f64;
            for (j, wj) in w.iter_mut().enumerate() {
                *wj = cubic(((j as i64 + xmin) as f64 - center + 0.5) * invscale);
                total += *wj;
            }
            if total != 0.0 {
                for wj in w.iter_mut() {
                    *wj /= total;
                    wmax = wmax.max(*wj);
                }
            }
            start.push(xmin as usize);
            len.push(n);
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wmax * (1u64 << (precision + 1)) as f64) as i64;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let one = (1u64 << precision) as f64;
        let weights = wf
            .iter()
            .map(|&w| {
                let v = w * one;
                (if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 }) as i16
            })
            .collect();
        Taps { start, len, weights, ksize, precision }
    }

    #[inline]
    fn get(&self, i: usize) -> (usize, &[i16]) {
        let w = &self.weights[i * self.ksize..i * self.ksize + self.len[i]];
        (self.start[i], w)
    }
}

/// The horizontal pass of one plane, `w` x `h` bytes to `ow` x `h`, rounded to uint8 as aten does between the
/// passes. It takes the plane already transposed (`cols`: `w` lines of `h` bytes, from `transpose`) so that, like
/// the vertical pass, each output line is a weighted sum of whole input lines, which vectorizes; transposing
/// costs far less than per-pixel gathers, and the caller shares one transpose between canvas and thumbnail.
pub(crate) fn horizontal(cols: &[u8], w: usize, h: usize, ow: usize) -> Vec<u8> {
    let taps = Taps::new(w, ow);
    let mut out_cols = vec![0u8; h * ow];
    out_cols
        .par_chunks_mut(h)
        .with_min_len(16)
        .enumerate()
        .for_each_init(|| vec![0i32; h], |acc, (x, out)| combine(cols, h, 0, &taps, x, acc, out));
    transpose(&out_cols, h, ow)
}

/// Output line `i` of a pass, restricted to bytes `offset..offset + out.len()` of each input line of `stride`
/// bytes: out = clamp((2^(p-1) + sum_j w_ij * line_(start_i + j)) >> p, 0, 255).
pub(crate) fn combine(
    src: &[u8],
    stride: usize,
    offset: usize,
    taps: &Taps,
    i: usize,
    acc: &mut [i32],
    out: &mut [u8],
) {
    let (first, ws) = taps.get(i);
    let acc = &mut acc[..out.len()];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); the function is the portable code compiled with it.
        unsafe { combine_avx2(src, stride, offset + first * stride, ws, taps.precision, acc, out) };
        return;
    }
    combine_portable(src, stride, offset + first * stride, ws, taps.precision, acc, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn combine_avx2(
    src: &[u8],
    stride: usize,
    start: usize,
    ws: &[i16],
    precision: u32,
    acc: &mut [i32],
    out: &mut [u8],
) {
    combine_portable(src, stride, start, ws, precision, acc, out)
}

/// Taps two at a time so the accumulator line is loaded and stored half as often.
#[inline(always)]
fn combine_portable(
    src: &[u8],
    stride: usize,
    start: usize,
    ws: &[i16],
    precision: u32,
    acc: &mut [i32],
    out: &mut [u8],
) {
    let n = out.len();
    let line = |j: usize| &src[start + j * stride..start + j * stride + n];
    acc.fill(1i32 << (precision - 1));
    let mut pairs = ws.chunks_exact(2);
    let mut j = 0;
    for pair in &mut pairs {
        let (k0, k1) = (pair[0] as i32, pair[1] as i32);
        for ((a, &p0), &p1) in acc.iter_mut().zip(line(j)).zip(line(j + 1)) {
            *a += p0 as i32 * k0 + p1 as i32 * k1;
        }
        j += 2;
    }
    if let [k] = pairs.remainder() {
        let k = *k as i32;
        for (a, &p) in acc.iter_mut().zip(line(j)) {
            *a += p as i32 * k;
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = (a >> precision).clamp(0, 255) as u8;
    }
}

/// Transposes a `w` x `h` byte plane into an `h` x `w` one. Each task owns a band of 8 output lines and moves
/// 8x8 blocks as eight u64 words through `transpose8`; ragged edges go byte by byte.
pub(crate) fn transpose(src: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    out.par_chunks_mut(8 * h).enumerate().for_each(|(bx, dst)| {
        let x0 = bx * 8;
        let xn = dst.len() / h;
        let mut y0 = 0;
        if xn == 8 {
            while y0 + 8 <= h {
                let mut m = [0u64; 8];
                for (r, v) in m.iter_mut().enumerate() {
                    let s = (y0 + r) * w + x0;
                    *v = u64::from_le_bytes(src[s..s + 8].try_into().unwrap_or([0; 8]));
                }
                transpose8(&mut m);
                for (c, v) in m.iter().enumerate() {
                    let d = c * h + y0;
                    dst[d..d + 8].copy_from_slice(&v.to_le_bytes());
                }
                y0 += 8;
            }
        }
        for y in y0..h {
            for c in 0..xn {
                dst[c * h + y] = src[y * w + x0 + c];
            }
        }
    });
    out
}

/// Transposes an 8x8 byte matrix held as 8 little-endian rows (byte k of word i = element (i, k)), by swapping
/// 1-byte, then 2-byte, then 4-byte blocks across the diagonal. Written out so every shift is a constant.
#[inline(always)]
fn transpose8(m: &mut [u64; 8]) {
    #[inline(always)]
    fn swap(a: &mut u64, b: &mut u64, shift: u32, mask: u64) {
        let t = ((*a >> shift) ^ *b) & mask;
        *b ^= t;
        *a ^= t << shift;
    }
    const M1: u64 = 0x00FF_00FF_00FF_00FF;
    const M2: u64 = 0x0000_FFFF_0000_FFFF;
    const M4: u64 = 0x0000_0000_FFFF_FFFF;
    let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7] = *m;
    swap(&mut a0, &mut a1, 8, M1);
    swap(&mut a2, &mut a3, 8, M1);
    swap(&mut a4, &mut a5, 8, M1);
    swap(&mut a6, &mut a7, 8, M1);
    swap(&mut a0, &mut a2, 16, M2);
    swap(&mut a1, &mut a3, 16, M2);
    swap(&mut a4, &mut a6, 16, M2);
    swap(&mut a5, &mut a7, 16, M2);
    swap(&mut a0, &mut a4, 32, M4);
    swap(&mut a1, &mut a5, 32, M4);
    swap(&mut a2, &mut a6, 32, M4);
    swap(&mut a3, &mut a7, 32, M4);
    *m = [a0, a1, a2, a3, a4, a5, a6, a7];
}

/// Whole-plane resize, for tests: the pipeline itself fuses the vertical pass with normalization (`super`).
#[cfg(test)]
pub(crate) fn resize_plane(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let mid = if ow != w { horizontal(&transpose(src, w, h), w, h, ow) } else { src.to_vec() };
    if oh == h {
        return mid;
    }
    let taps = Taps::new(h, oh);
    let mut out = vec![0u8; ow * oh];
    let mut acc = vec![0i32; ow];
    for (y, o) in out.chunks_mut(ow).enumerate() {
        combine(&mid, ow, 0, &taps, y, &mut acc, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(300, 448), (1024, 448), (5, 1344), (2000, 5376), (448, 447)] {
            let t = Taps::new(i, o);
            for x in 0..o {
                let (_, ws) = t.get(x);
                let sum: i32 = ws.iter().map(|&k| k as i32).sum();
                let one = 1i32 << t.precision;
                assert!((sum - one).abs() <= ws.len() as i32, "{i}->{o} at {x}: {sum} vs {one}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let (w, h) = (37, 23);
        let src = vec![77u8; w * h];
        for (ow, oh) in [(448, 448), (11, 5), (37, 100), (200, 23)] {
            let out = resize_plane(&src, w, h, ow, oh);
            assert_eq!(out.len(), ow * oh);
            assert!(out.iter().all(|&v| v == 77), "{ow}x{oh}");
        }
    }

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..5 * 4).map(|v| v as u8).collect();
        assert_eq!(resize_plane(&src, 5, 4, 5, 4), src);
    }

    #[test]
    fn transpose_matches_definition() {
        for (w, h) in [(1, 1), (8, 8), (16, 24), (13, 9), (3, 17), (64, 5)] {
            let src: Vec<u8> = (0..w * h).map(|v| (v * 7 % 251) as u8).collect();
            let t = transpose(&src, w, h);
            for y in 0..h {
                for x in 0..w {
                    assert_eq!(t[x * h + y], src[y * w + x], "{w}x{h} at ({x}, {y})");
                }
            }
        }
    }
}

//! Chroma upsampling and colour conversion as libjpeg-turbo does them with its defaults (`do_fancy_upsampling`
//! on, as PIL leaves it): triangle-filter ("fancy") 2x upsampling with its alternating rounding bias for
//! h2v1 / h1v2 / h2v2, edge replication at the component's true downsampled size, box replication for other
//! integral ratios, then the table-driven 16-bit fixed-point YCbCr -> RGB conversion of jdcolor.c.

use rayon::prelude::*;

use super::JpegError;

/// A decoded component plane (after IDCT) and the part of it that holds real samples.
pub(super) struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    /// ceil(image_width * h / max_h): samples past this are padding and never read.
    pub width: usize,
    pub height: usize,
    /// Output pixels per sample horizontally and vertically (max_h / h, max_v / v).
    pub hx: usize,
    pub vy: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Full,
    H2V1Fancy,
    H1V2Fancy,
    H2V2Fancy,
    /// Box replication (h2v1 / h2v2 when the plane is at most 2 samples wide, and any other integral ratio).
    Replicate,
}

impl Plane<'_> {
    /// libjpeg-turbo's choice in jinit_upsampler, in the same order of tests.
    fn method(&self) -> Method {
        match (self.hx, self.vy) {
            (1, 1) => Method::Full,
            (2, 1) if self.width > 2 => Method::H2V1Fancy,
            (1, 2) => Method::H1V2Fancy,
            (2, 2) if self.width > 2 => Method::H2V2Fancy,
            _ => Method::Replicate,
        }
    }

    fn row(&self, y: usize) -> &[u8] {
        let y = y.min(self.height - 1);
        &self.data[y * self.stride..y * self.stride + self.width]
    }

    /// Writes output row `y` of this component into `out[..w]` (w = image width); the 2x methods may also write
    /// `out[w]` when w is odd, so `out` holds w + 1 bytes.
    fn upsample_row(&self, method: Method, y: usize, w: usize, out: &mut [u8], sums: &mut Vec<i32>) {
        match method {
            Method::Full => out[..w].copy_from_slice(&self.row(y)[..w]),
            Method::Replicate => {
                let src = self.row(y / self.vy);
                for (x, o) in out[..w].iter_mut().enumerate() {
                    *o = src[x / self.hx];
                }
            }
            Method::H2V1Fancy => fancy_h2(self.row(y), out),
            Method::H1V2Fancy => {
                let (near, far, bias) = self.vertical_pair(y);
                for ((o, &a), &b) in out[..w].iter_mut().zip(near).zip(far) {
                    *o = ((a as i32 * 3 + b as i32 + bias) >> 2) as u8;
                }
            }
            Method::H2V2Fancy => {
                let (near, far, _) = self.vertical_pair(y);
                sums.clear();
                sums.extend(near.iter().zip(far).map(|(&a, &b)| a as i32 * 3 + b as i32));
                fancy_h2_sums(sums, out);
            }
        }
    }

    /// For 2x vertical upsampling: the nearest sample row, the next nearest (above for even output rows, below
    /// for odd ones, clamped to the real rows) and libjpeg's bias for the h1v2 case (1 above, 2 below).
    fn vertical_pair(&self, y: usize) -> (&[u8], &[u8], i32) {
        let iy = y / 2;
        if y.is_multiple_of(2) {
            (self.row(iy), self.row(iy.saturating_sub(1)), 1)
        } else {
            (self.row(iy), self.row(iy + 1), 2)
        }
    }
}

/// h2v1 fancy into `out[..2 * src.len()]`: output 2j is (3*in[j] + in[j-1] + 1) >> 2, output 2j+1 is
/// (3*in[j] + in[j+1] + 2) >> 2; the first and last outputs copy the edge sample. Needs 3 or more samples.
fn fancy_h2(src: &[u8], out: &mut [u8]) {
    let n = src.len();
    let s = |j: usize| src[j] as i32;
    out[0] = src[0];
    out[1] = ((s(0) * 3 + s(1) + 2) >> 2) as u8;
    for (o, w) in out[2..2 * n - 2].chunks_exact_mut(2).zip(src.windows(3)) {
        let t = w[1] as i32 * 3;
        o[0] = ((t + w[0] as i32 + 1) >> 2) as u8;
        o[1] = ((t + w[2] as i32 + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((s(n - 1) * 3 + s(n - 2) + 1) >> 2) as u8;
    out[2 * n - 1] = src[n - 1];
}

/// h2v2 fancy on column sums c = 3*near + far, into `out[..2 * c.len()]`: outputs (3*c[j] + c[j-1] + 8) >> 4 and
/// (3*c[j] + c[j+1] + 7) >> 4, edges (4*c + 8) >> 4 and (4*c + 7) >> 4. Needs 3 or more sums.
fn fancy_h2_sums(c: &[i32], out: &mut [u8]) {
    let n = c.len();
    out[0] = ((c[0] * 4 + 8) >> 4) as u8;
    out[1] = ((c[0] * 3 + c[1] + 7) >> 4) as u8;
    for (o, w) in out[2..2 * n - 2].chunks_exact_mut(2).zip(c.windows(3)) {
        let t = w[1] * 3;
        o[0] = ((t + w[0] + 8) >> 4) as u8;
        o[1] = ((t + w[2] + 7) >> 4) as u8;
    }
    out[2 * n - 2] = ((c[n - 1] * 3 + c[n - 2] + 8) >> 4) as u8;
    out[2 * n - 1] = ((c[n - 1] * 4 + 7) >> 4) as u8;
}

/// What the samples mean, decided as libjpeg's default_decompress_parms does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ColorSpace {
    Gray,
    YCbCr,
    Rgb,
}

const SCALEBITS: u32 = 16;
const ONE_HALF: i32 = 1 << (SCALEBITS - 1);

/// FIX(x) = (x * 2^16 + 0.5) truncated, for the four constants of jdcolor.c.
const FIX_1_40200: i32 = 91881;
const FIX_1_77200: i32 = 116130;
const FIX_0_71414: i32 = 46802;
const FIX_0_34414: i32 = 22554;

#[inline(always)]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// One row of YCbCr -> RGB. libjpeg looks up per-sample tables (Cr_r_tab = (FIX(1.402)*x + 1/2) >> 16, Cb_b_tab
/// likewise, Cr_g_tab and Cb_g_tab left unshifted with the 1/2 in Cb_g_tab); computing the same integer
/// expressions inline gives the same values and vectorizes.
fn ycc_row(y: &[u8], cb: &[u8], cr: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); the function is the portable code compiled with it.
        unsafe { ycc_row_avx2(y, cb, cr, r, g, b) };
        return;
    }
    ycc_row_portable(y, cb, cr, r, g, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn ycc_row_avx2(y: &[u8], cb: &[u8], cr: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    ycc_row_portable(y, cb, cr, r, g, b)
}

#[inline(always)]
fn ycc_row_portable(y: &[u8], cb: &[u8], cr: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    let outs = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
    for (((r, g), b), ((&yy, &cb), &cr)) in outs.zip(y.iter().zip(cb).zip(cr)) {
        let (yy, cb, cr) = (yy as i32, cb as i32 - 128, cr as i32 - 128);
        *r = clamp8(yy + ((FIX_1_40200 * cr + ONE_HALF) >> SCALEBITS));
        *g = clamp8(yy + ((-FIX_0_34414 * cb + ONE_HALF - FIX_0_71414 * cr) >> SCALEBITS));
        *b = clamp8(yy + ((FIX_1_77200 * cb + ONE_HALF) >> SCALEBITS));
    }
}

/// Upsamples every component to `width` x `height` and converts to planar RGB (R plane, G plane, B plane). Gray
/// is replicated into the three planes, which is what PIL's convert("RGB") does with the "L" image libjpeg
/// returns for one-component files.
pub(super) fn to_rgb(planes: &[Plane], space: ColorSpace, width: usize, height: usize) -> Result<Vec<u8>, JpegError> {
    let methods: Vec<Method> = planes.iter().map(Plane::method).collect();
    let expected = if space == ColorSpace::Gray { 1 } else { 3 };
    if planes.len() != expected {
        return Err(JpegError::Unsupported(format!("{} components", planes.len())));
    }
    let n = width * height;
    let mut rgb = vec![0u8; 3 * n];
    let (r_plane, rest) = rgb.split_at_mut(n);
    let (g_plane, b_plane) = rest.split_at_mut(n);
    let line = width + 1;
    let rows = r_plane.par_chunks_mut(width).zip(g_plane.par_chunks_mut(width)).zip(b_plane.par_chunks_mut(width));
    rows.enumerate().for_each_init(
        || (vec![0u8; line * 3], Vec::new()),
        |(scratch, sums), (y, ((r_out, g_out), b_out))| {
            let (s0, rest) = scratch.split_at_mut(line);
            let (s1, s2) = rest.split_at_mut(line);
            let bufs: [&mut [u8]; 3] = [s0, s1, s2];
            let mut rows: [&[u8]; 3] = [&[], &[], &[]];
            for (((plane, &m), buf), row) in planes.iter().zip(&methods).zip(bufs).zip(&mut rows) {
                *row = if m == Method::Full {
                    &plane.row(y)[..width]
                } else {
                    plane.upsample_row(m, y, width, buf, sums);
                    &buf[..width]
                };
            }
            match space {
                ColorSpace::Gray => {
                    r_out.copy_from_slice(rows[0]);
                    g_out.copy_from_slice(rows[0]);
                    b_out.copy_from_slice(rows[0]);
                }
                ColorSpace::Rgb => {
                    r_out.copy_from_slice(rows[0]);
                    g_out.copy_from_slice(rows[1]);
                    b_out.copy_from_slice(rows[2]);
                }
                ColorSpace::YCbCr => ycc_row(rows[0], rows[1], rows[2], r_out, g_out, b_out),
            }
        },
    );
    Ok(rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2v1_fancy_matches_hand_computation() {
        let src = [10u8, 20, 40];
        let mut out = [0u8; 6];
        fancy_h2(&src, &mut out);
        // 10, (30+20+2)>>2=13, (60+10+1)>>2=17, (60+40+2)>>2=25, (120+20+1)>>2=35, 40
        assert_eq!(out, [10, 13, 17, 25, 35, 40]);
    }

    #[test]
    fn ycc_matches_libjpeg_tables() {
        // The tables of jdcolor.c, built as libjpeg builds them, against the inline arithmetic, on every Cb/Cr.
        for cb in 0..=255u8 {
            let ys = [0u8, 1, 17, 128, 200, 254, 255];
            for &yy in &ys {
                let crs: Vec<u8> = (0..=255).collect();
                let (n, y, cbs) = (crs.len(), vec![yy; 256], vec![cb; 256]);
                let (mut r, mut g, mut b) = (vec![0; n], vec![0; n], vec![0; n]);
                ycc_row(&y, &cbs, &crs, &mut r, &mut g, &mut b);
                for (i, &cr) in crs.iter().enumerate() {
                    let (x_cb, x_cr) = (cb as i32 - 128, cr as i32 - 128);
                    let cr_r = (FIX_1_40200 * x_cr + ONE_HALF) >> SCALEBITS;
                    let cb_b = (FIX_1_77200 * x_cb + ONE_HALF) >> SCALEBITS;
                    let cr_g = -FIX_0_71414 * x_cr;
                    let cb_g = -FIX_0_34414 * x_cb + ONE_HALF;
                    let yy = yy as i32;
                    assert_eq!(r[i], clamp8(yy + cr_r));
                    assert_eq!(g[i], clamp8(yy + ((cb_g + cr_g) >> SCALEBITS)));
                    assert_eq!(b[i], clamp8(yy + cb_b));
                }
            }
        }
        let (mut r, mut g, mut b) = ([0u8; 1], [0u8; 1], [0u8; 1]);
        ycc_row(&[77], &[128], &[128], &mut r, &mut g, &mut b);
        assert_eq!((r[0], g[0], b[0]), (77, 77, 77));
    }
}

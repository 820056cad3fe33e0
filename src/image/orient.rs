//! EXIF orientation, as PIL's `ImageOps.exif_transpose` applies it: the Orientation tag (0x0112) of IFD0 when
//! present with a single value, else the `tiff:Orientation` of the XMP packet; values 2..=8 map to
//! FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM, TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90, anything else
//! leaves the image alone.

use rayon::prelude::*;

use super::resize::transpose;

/// The raw Orientation value of an EXIF block (with or without its "Exif\0\0" prefix). `Some(0)` when the tag is
/// present but unusable (several values): PIL then neither transposes nor looks at XMP.
pub(crate) fn exif_orientation(exif: &[u8]) -> Option<u32> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let le = match tiff.get(..4)? {
        [b'I', b'I', 42, 0] => true,
        [b'M', b'M', 0, 42] => false,
        _ => return None,
    };
    let u16_at = |p: usize| -> Option<u32> {
        let b = tiff.get(p..p + 2)?;
        Some(if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) } as u32)
    };
    let u32_at = |p: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(p..p + 4)?.try_into().ok()?;
        Some(if le { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    for i in 0..count {
        let e = ifd.checked_add(2 + 12 * i)?;
        if u16_at(e)? != 0x0112 {
            continue;
        }
        let (typ, n) = (u16_at(e + 2)?, u32_at(e + 4)?);
        if n != 1 {
            return Some(0);
        }
        return match typ {
            1 | 6 => tiff.get(e + 8).map(|&b| b as u32),
            3 | 8 => u16_at(e + 8),
            4 | 9 => u32_at(e + 8),
            _ => Some(0),
        };
    }
    None
}

/// PIL's fallback: the first `tiff:Orientation="N"` or `tiff:Orientation>N` in the XMP packet.
pub(crate) fn xmp_orientation(xmp: &[u8]) -> Option<u32> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut from = 0;
    while let Some(off) = xmp.get(from..)?.windows(KEY.len()).position(|w| w == KEY) {
        let rest = &xmp[from + off + KEY.len()..];
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(*d),
            _ => None,
        };
        if let Some(d) = digit {
            return Some((d - b'0') as u32);
        }
        from += off + KEY.len();
    }
    None
}

/// Orientation to apply, following PIL's precedence between EXIF and XMP.
pub(crate) fn orientation(exif: Option<&[u8]>, xmp: Option<&[u8]>) -> u32 {
    match exif.and_then(exif_orientation) {
        Some(v) => v,
        None => xmp.and_then(xmp_orientation).unwrap_or(1),
    }
}

/// Orientation `o` as an optional transpose followed by optional horizontal and vertical flips:
/// 2 flip x, 3 flip both, 4 flip y, 5 transpose, 6 transpose + flip x (90 clockwise), 7 transpose + flip both,
/// 8 transpose + flip y (90 counter-clockwise); None for 1 and anything invalid.
fn parts(o: u32) -> Option<(bool, bool, bool)> {
    match o {
        2 => Some((false, true, false)),
        3 => Some((false, true, true)),
        4 => Some((false, false, true)),
        5 => Some((true, false, false)),
        6 => Some((true, true, false)),
        7 => Some((true, true, true)),
        8 => Some((true, false, true)),
        _ => None,
    }
}

/// Size after orientation `o` of a `w` x `h` image.
pub(crate) fn dims(o: u32, w: usize, h: usize) -> (usize, usize) {
    match parts(o) {
        Some((true, _, _)) => (h, w),
        _ => (w, h),
    }
}

/// One plane (`w` x `h` bytes) with orientation `o` applied; None when `o` leaves it as it is.
pub(crate) fn oriented_if_needed(o: u32, w: usize, h: usize, plane: &[u8]) -> Option<Vec<u8>> {
    let (t, fx, fy) = parts(o)?;
    let (mut out, ow, oh) = if t { (transpose(plane, w, h), h, w) } else { (plane.to_vec(), w, h) };
    flip(&mut out, ow, oh, fx, fy);
    Some(out)
}

#[cfg(test)]
fn oriented(o: u32, w: usize, h: usize, plane: &[u8]) -> Vec<u8> {
    oriented_if_needed(o, w, h, plane).unwrap_or_else(|| plane.to_vec())
}

/// The transpose of `oriented(o, w, h, plane)`, which is what the horizontal resize pass consumes, computed
/// without the intermediate: transposing a flip swaps its axis, and two transposes cancel, so for the rotations
/// (5..=8, nearly every phone photo) this is the source plane flipped, with no transpose at all.
pub(crate) fn transposed(o: u32, w: usize, h: usize, plane: &[u8]) -> Vec<u8> {
    let (t, fx, fy) = parts(o).unwrap_or((false, false, false));
    let (mut out, tw, th) = if t { (plane.to_vec(), w, h) } else { (transpose(plane, w, h), h, w) };
    flip(&mut out, tw, th, fy, fx);
    out
}

fn flip(plane: &mut [u8], w: usize, h: usize, flip_x: bool, flip_y: bool) {
    match (flip_x, flip_y) {
        (true, true) => plane.reverse(),
        (true, false) => plane.par_chunks_mut(w).for_each(<[u8]>::reverse),
        (false, true) => {
            let (top, bottom) = plane.split_at_mut(h / 2 * w);
            let bottom = &mut bottom[(h % 2) * w..];
            top.par_chunks_mut(w).zip(bottom.par_chunks_mut(w).rev()).for_each(|(a, b)| a.swap_with_slice(b));
        }
        (false, false) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3x2 plane numbering the pixels 1..6 row-major: 1 2 3 / 4 5 6.
    fn red(o: u32) -> (usize, usize, Vec<u8>) {
        let (w, h) = dims(o, 3, 2);
        (w, h, oriented(o, 3, 2, &[1, 2, 3, 4, 5, 6]))
    }

    #[test]
    fn all_eight_orientations_match_pil_transposes() {
        assert_eq!(red(1), (3, 2, vec![1, 2, 3, 4, 5, 6]));
        assert_eq!(red(2), (3, 2, vec![3, 2, 1, 6, 5, 4])); // FLIP_LEFT_RIGHT
        assert_eq!(red(3), (3, 2, vec![6, 5, 4, 3, 2, 1])); // ROTATE_180
        assert_eq!(red(4), (3, 2, vec![4, 5, 6, 1, 2, 3])); // FLIP_TOP_BOTTOM
        assert_eq!(red(5), (2, 3, vec![1, 4, 2, 5, 3, 6])); // TRANSPOSE
        assert_eq!(red(6), (2, 3, vec![4, 1, 5, 2, 6, 3])); // ROTATE_270 (90 clockwise)
        assert_eq!(red(7), (2, 3, vec![6, 3, 5, 2, 4, 1])); // TRANSVERSE
        assert_eq!(red(8), (2, 3, vec![3, 6, 2, 5, 1, 4])); // ROTATE_90 (counter-clockwise)
        assert_eq!(red(9), (3, 2, vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn transposed_is_transpose_of_oriented() {
        for (w, h) in [(3, 2), (17, 9), (8, 16), (1, 5)] {
            let plane: Vec<u8> = (0..w * h).map(|v| (v * 13 % 256) as u8).collect();
            for o in 1..=8 {
                let (ow, oh) = dims(o, w, h);
                let want = transpose(&oriented(o, w, h, &plane), ow, oh);
                assert_eq!(transposed(o, w, h, &plane), want, "{w}x{h} orientation {o}");
            }
        }
    }

    #[test]
    fn exif_parsing() {
        // Big-endian TIFF, one IFD entry: Orientation SHORT 1 value 6.
        let mut be = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        be.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]);
        assert_eq!(exif_orientation(&be), Some(6));
        let mut le = b"II\x2a\0\x08\0\0\0\x01\0".to_vec();
        le.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 8, 0, 0, 0]);
        assert_eq!(exif_orientation(&le), Some(8));
        assert_eq!(exif_orientation(b"Exif\0\0garbage"), None);
        assert_eq!(exif_orientation(&le[..15]), None);
    }

    #[test]
    fn xmp_fallback() {
        assert_eq!(xmp_orientation(br#"<x tiff:Orientation="3"/>"#), Some(3));
        assert_eq!(xmp_orientation(b"<tiff:Orientation>6</tiff:Orientation>"), Some(6));
        assert_eq!(xmp_orientation(b"tiff:Orientation=x tiff:Orientation>8"), Some(8));
        assert_eq!(orientation(None, Some(b"tiff:Orientation>8")), 8);
        assert_eq!(orientation(Some(b"II\x2a\0\x08\0\0\0\0\0"), Some(b"tiff:Orientation>8")), 8);
    }
}

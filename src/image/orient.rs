//! EXIF orientation, as PIL's `ImageOps.exif_transpose` applies it: the Orientation tag (0x0112) of IFD0 when
//! present with a single value, else the `tiff:Orientation` of the XMP packet; values 2..=8 map to
//! FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM, TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90, anything else
//! leaves the image alone.

use rayon::prelude::*;

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

/// Applies orientation `o` to a planar RGB image (three `w * h` planes); returns the new (width, height, pixels).
pub(crate) fn apply(o: u32, w: usize, h: usize, src: Vec<u8>) -> (usize, usize, Vec<u8>) {
    // For each output pixel (x, y) of the output size, the source pixel it copies.
    type Map = fn(usize, usize, usize, usize) -> (usize, usize);
    let (ow, oh, map): (usize, usize, Map) = match o {
        2 => (w, h, |x, y, w, _| (w - 1 - x, y)),
        3 => (w, h, |x, y, w, h| (w - 1 - x, h - 1 - y)),
        4 => (w, h, |x, y, _, h| (x, h - 1 - y)),
        5 => (h, w, |x, y, _, _| (y, x)),
        6 => (h, w, |x, y, _, h| (y, h - 1 - x)),
        7 => (h, w, |x, y, w, h| (w - 1 - y, h - 1 - x)),
        8 => (h, w, |x, y, w, _| (w - 1 - y, x)),
        _ => return (w, h, src),
    };
    let n = w * h;
    let mut out = vec![0u8; 3 * n];
    out.par_chunks_mut(ow).enumerate().for_each(|(i, row)| {
        let (c, y) = (i / oh, i % oh);
        let plane = &src[c * n..(c + 1) * n];
        for (x, px) in row.iter_mut().enumerate() {
            let (sx, sy) = map(x, y, w, h);
            *px = plane[sy * w + sx];
        }
    });
    (ow, oh, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A planar 3x2 image whose red plane numbers the pixels 1..6 row-major (1 2 3 / 4 5 6), green is 10 more,
    /// blue 20 more.
    fn img() -> Vec<u8> {
        (0..3u8).flat_map(|c| (1..=6u8).map(move |v| v + 10 * c)).collect()
    }

    fn red(o: u32) -> (usize, usize, Vec<u8>) {
        let (w, h, px) = apply(o, 3, 2, img());
        assert!(px[6..12].iter().zip(&px[..6]).all(|(g, r)| *g == r + 10), "planes move together");
        (w, h, px[..6].to_vec())
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

//! Bytes -> oriented RGB pixels, as `transformers.image_utils.load_image` gets them from PIL: open, apply EXIF
//! orientation, `convert("RGB")`.
//!
//! JPEG goes through the libjpeg-compatible decoder of `jpeg/`; PNG, WebP, BMP and GIF (first frame) through the
//! `image` crate, whose output for these formats matches PIL's. PIL's RGB conversion drops alpha without
//! compositing, replicates gray, and reads 16-bit RGB(A) and gray+alpha PNGs by their high byte; 16-bit gray
//! without alpha becomes PIL mode "I;16", which `convert("RGB")` clips at 255 (a nearly white image), so those are
//! refused with an explanation rather than reproduced.
//!
//! Every size check happens on the header, before pixel data is decoded.

use std::borrow::Cow;
use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::{jpeg, orient};
use crate::{Error, Result};

/// A decoded image: the R, G and B planes of the stored image, one after the other, and the orientation to
/// apply. Planes suit the rest of the pipeline (byte transposes, per-channel normalization) better than pixels,
/// and keeping the orientation pending lets the resize take the oriented image already transposed, which for
/// rotated photos is just a flip of the stored planes (`orient::transposed`).
pub(crate) struct Rgb {
    /// Size after orientation.
    pub width: usize,
    pub height: usize,
    stored_width: usize,
    stored_height: usize,
    orientation: u32,
    data: Vec<u8>,
}

impl Rgb {
    fn stored_plane(&self, c: usize) -> &[u8] {
        let n = self.stored_width * self.stored_height;
        &self.data[c * n..(c + 1) * n]
    }

    /// Channel `c` of the oriented image, `width * height` bytes.
    pub(crate) fn plane(&self, c: usize) -> Cow<'_, [u8]> {
        match orient::oriented_if_needed(self.orientation, self.stored_width, self.stored_height, self.stored_plane(c))
        {
            Some(p) => Cow::Owned(p),
            None => Cow::Borrowed(self.stored_plane(c)),
        }
    }

    /// Channel `c` of the oriented image, transposed: `width` lines of `height` bytes.
    pub(crate) fn transposed_plane(&self, c: usize) -> Vec<u8> {
        orient::transposed(self.orientation, self.stored_width, self.stored_height, self.stored_plane(c))
    }
}

/// Planar RGB from `n` pixels.
fn planar(n: usize, pixels: impl Iterator<Item = [u8; 3]>) -> Vec<u8> {
    let mut data = vec![0u8; 3 * n];
    let (r, rest) = data.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (((px, r), g), b) in pixels.zip(r).zip(g).zip(b) {
        (*r, *g, *b) = (px[0], px[1], px[2]);
    }
    data
}

fn err(name: &str, msg: impl Into<String>) -> Error {
    Error::Image { source_name: name.to_string(), msg: msg.into() }
}

fn check_size(name: &str, w: usize, h: usize, max_pixels: u64) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(err(name, format!("image has zero size ({w}x{h})")));
    }
    let n = w as u64 * h as u64;
    if n > max_pixels {
        return Err(err(name, format!("{w}x{h} = {n} pixels is over the limit of {max_pixels} pixels")));
    }
    Ok(())
}

pub(crate) fn decode(bytes: &[u8], name: &str, max_pixels: u64) -> Result<Rgb> {
    if bytes.is_empty() {
        return Err(err(name, "empty file"));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        err(name, format!("not a JPEG, PNG, WebP, BMP or GIF image (starts with bytes {})", head.join(" ")))
    })?;
    let (w, h, data, o) = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, name, max_pixels)?,
        ImageFormat::Png | ImageFormat::WebP | ImageFormat::Bmp | ImageFormat::Gif => {
            decode_other(bytes, name, format, max_pixels)?
        }
        other => {
            return Err(err(name, format!("{other:?} images are not supported (JPEG, PNG, WebP, BMP or GIF)")));
        }
    };
    let (width, height) = orient::dims(o, w, h);
    Ok(Rgb { width, height, stored_width: w, stored_height: h, orientation: o, data })
}

type Pixels = (usize, usize, Vec<u8>, u32);

fn decode_jpeg(bytes: &[u8], name: &str, max_pixels: u64) -> Result<Pixels> {
    // Files libjpeg decodes but this decoder does not cover (CMYK, 12-bit...) go to the image crate's decoder,
    // which is close to, not exactly, what PIL returns for them (CMYK: within 1 level in a test).
    let fallback = || decode_other(bytes, name, ImageFormat::Jpeg, max_pixels);
    // Header first, so a huge frame is refused before any allocation.
    match jpeg::read_header(bytes) {
        Ok(hd) => check_size(name, hd.width, hd.height, max_pixels)?,
        Err(jpeg::JpegError::Unsupported(_)) => return fallback(),
        Err(e) => return Err(jpeg_error(name, e)),
    }
    match jpeg::decode(bytes, max_pixels) {
        Ok(d) => {
            let o = orient::orientation(d.exif.as_deref(), d.xmp.as_deref());
            Ok((d.width, d.height, d.rgb, o))
        }
        Err(jpeg::JpegError::Unsupported(_)) => fallback(),
        Err(e) => Err(jpeg_error(name, e)),
    }
}

fn jpeg_error(name: &str, e: jpeg::JpegError) -> Error {
    match e {
        jpeg::JpegError::Truncated => err(name, "truncated JPEG (the data ends before the image is complete)"),
        jpeg::JpegError::Invalid(m) => err(name, format!("corrupt JPEG: {m}")),
        jpeg::JpegError::Unsupported(m) => err(name, format!("unsupported JPEG: {m}")),
        jpeg::JpegError::TooLarge { width, height } => {
            err(name, format!("{width}x{height} pixels is over the pixel limit"))
        }
    }
}

fn decode_other(bytes: &[u8], name: &str, format: ImageFormat, max_pixels: u64) -> Result<Pixels> {
    let what = format!("{format:?}");
    let dec_err = |e: image::ImageError| err(name, format!("cannot decode {what}: {e}"));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The decoder's own allocation cap must not be tighter than the pixel limit we enforce ourselves.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 29));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(dec_err)?;
    let (w, h) = decoder.dimensions();
    check_size(name, w as usize, h as usize, max_pixels)?;
    let exif = decoder.exif_metadata().ok().flatten();
    let xmp = decoder.xmp_metadata().ok().flatten();
    let o = orient::orientation(exif.as_deref(), xmp.as_deref());
    let img = DynamicImage::from_decoder(decoder).map_err(dec_err)?;
    let n = w as usize * h as usize;
    let data = to_rgb(img, n).map_err(|m| err(name, m))?;
    Ok((w as usize, h as usize, data, o))
}

/// PIL's `convert("RGB")` on what PIL would have opened, as planes of `n` pixels.
fn to_rgb(img: DynamicImage, n: usize) -> std::result::Result<Vec<u8>, String> {
    let hi = |v: u16| (v >> 8) as u8;
    Ok(match img {
        DynamicImage::ImageRgb8(b) => planar(n, b.as_raw().chunks_exact(3).map(|p| [p[0], p[1], p[2]])),
        DynamicImage::ImageRgba8(b) => planar(n, b.as_raw().chunks_exact(4).map(|p| [p[0], p[1], p[2]])),
        DynamicImage::ImageLuma8(b) => b.as_raw().repeat(3),
        DynamicImage::ImageLumaA8(b) => planar(n, b.as_raw().chunks_exact(2).map(|p| [p[0]; 3])),
        DynamicImage::ImageRgb16(b) => planar(n, b.as_raw().chunks_exact(3).map(|p| [hi(p[0]), hi(p[1]), hi(p[2])])),
        DynamicImage::ImageRgba16(b) => planar(n, b.as_raw().chunks_exact(4).map(|p| [hi(p[0]), hi(p[1]), hi(p[2])])),
        DynamicImage::ImageLumaA16(b) => planar(n, b.as_raw().chunks_exact(2).map(|p| [hi(p[0]); 3])),
        DynamicImage::ImageLuma16(_) => {
            return Err("16-bit grayscale without alpha is not supported: the reference (PIL mode I;16, \
                        convert(\"RGB\")) clips every value above 255 to white; convert it to 8-bit first"
                .into())
        }
        other => return Err(format!("unsupported pixel format {:?}", other.color())),
    })
}

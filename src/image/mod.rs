//! Image preprocessing, exactly as transformers' `GotOcr2ImageProcessorFast` under `InternVLProcessor`
//! (MODEL_SPEC.md §4): decode, EXIF orientation, RGB conversion, dynamic tiling, antialiased bicubic resize on
//! uint8, fused rescale + normalize into `[tiles, 3, 448, 448]` f32.
//!
//! The reference is HF fed by `transformers.image_utils.load_image` (PIL). Every stage is reproduced
//! bit for bit, so the output equals HF's float32 `pixel_values` exactly on the fixtures
//! (tests/image_fixtures.rs): JPEG is decoded the way libjpeg-turbo does it (`jpeg/`), the other formats by the
//! `image` crate; `resize` mirrors aten's integer antialiased bicubic; `normalize` mirrors the f32 arithmetic.
//!
//! Stages: `decode` (bytes -> oriented RGB) -> `tiling::grid` -> `resize` to the grid canvas (and to 448x448 for
//! the thumbnail, in parallel), whose vertical pass feeds `normalize` line by line straight into the output
//! tiles, row-major, thumbnail last.
//!
//! OWNER: image helper. The public API below is the contract other modules use; keep these names.

mod decode;
mod jpeg;
mod normalize;
mod orient;
mod resize;
mod tiling;

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::path::Path;

use rayon::prelude::*;

use crate::{Error, Result};

/// Side of a tile in pixels (InternViT's input size).
pub const TILE: usize = 448;

/// Largest `max_tiles` the processor supports (its `max_patches` default; the model was trained with it).
pub const MAX_TILES: usize = 12;

/// Options of the image processor; defaults are the InternVL3-hf processor's.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Dynamic tiling (`crop_to_patches`); on by default as in `InternVLProcessor`.
    pub tiling: bool,
    /// Smallest number of tiles of the grid (`min_patches`).
    pub min_tiles: usize,
    /// Largest number of tiles of the grid (`max_patches`), 1..=12 (a thumbnail is added on top).
    pub max_tiles: usize,
    /// Images with more pixels than this are refused before decoding (decompression bombs).
    pub max_pixels: u64,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions { tiling: true, min_tiles: 1, max_tiles: 12, max_pixels: 64 * 1024 * 1024 }
    }
}

/// The preprocessed image: what the vision tower consumes.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// Grid chosen by the tiling rule, as (columns, rows); (1, 1) when tiling is off.
    pub grid: (usize, usize),
    /// Number of tiles, the thumbnail included (columns * rows, + 1 when that is not 1).
    pub num_tiles: usize,
    /// `[num_tiles, 3, 448, 448]` row-major, normalized.
    pub pixel_values: Vec<f32>,
    /// (width, height) of the decoded image after EXIF orientation, before any resize.
    pub original_size: (usize, usize),
}

impl Preprocessed {
    pub fn shape(&self) -> [usize; 4] {
        [self.num_tiles, 3, TILE, TILE]
    }
}

impl ImageOptions {
    fn validate(&self) -> Result<()> {
        if !(1..=MAX_TILES).contains(&self.max_tiles) {
            return Err(Error::Invalid(format!("max_tiles must be in 1..={MAX_TILES}, got {}", self.max_tiles)));
        }
        if !(1..=self.max_tiles).contains(&self.min_tiles) {
            return Err(Error::Invalid(format!(
                "min_tiles must be in 1..=max_tiles ({}), got {}",
                self.max_tiles, self.min_tiles
            )));
        }
        if self.max_pixels == 0 {
            return Err(Error::Invalid("max_pixels must be positive".into()));
        }
        Ok(())
    }
}

/// Decode, orient and preprocess an image file.
pub fn preprocess_file(path: &Path, opts: &ImageOptions) -> Result<Preprocessed> {
    opts.validate()?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    preprocess_bytes(&bytes, &path.display().to_string(), opts)
}

/// Decode, orient and preprocess encoded image bytes; `source_name` names the input in errors.
pub fn preprocess_bytes(bytes: &[u8], source_name: &str, opts: &ImageOptions) -> Result<Preprocessed> {
    opts.validate()?;
    let img = decode::decode(bytes, source_name, opts.max_pixels)?;
    Ok(preprocess_rgb(&img, opts))
}

fn preprocess_rgb(img: &decode::Rgb, opts: &ImageOptions) -> Preprocessed {
    let (w, h) = (img.width, img.height);
    let (cols, rows) = if opts.tiling { tiling::grid(w, h, opts.min_tiles, opts.max_tiles) } else { (1, 1) };
    let blocks = cols * rows;
    let num_tiles = if blocks == 1 { 1 } else { blocks + 1 };
    let lut = normalize::tables();
    let n = num_tiles * PLANE * 3;
    let mut pixel_values: Vec<f32> = Vec::with_capacity(n);
    {
        let out = &mut pixel_values.spare_capacity_mut()[..n];
        let (grid_tiles, thumb) = out.split_at_mut(blocks * PLANE * 3);
        // A horizontal pass works on transposed planes (shared by canvas and thumbnail); an unchanged width
        // reads the oriented planes directly.
        let thumb_w = if blocks != 1 { Some(TILE) } else { None };
        let widths = [Some(cols * TILE), thumb_w];
        let transposed: Vec<Vec<u8>> = if widths.iter().flatten().any(|&cw| cw != w) {
            (0..3).into_par_iter().map(|c| img.transposed_plane(c)).collect()
        } else {
            Vec::new()
        };
        let plain: Vec<Cow<[u8]>> =
            if widths.contains(&Some(w)) { (0..3).map(|c| img.plane(c)).collect() } else { Vec::new() };
        let src = Source { w, h, plain: &plain, transposed: &transposed };
        // The grid canvas and the thumbnail are independent resizes of the original.
        rayon::join(|| render_tiles(&src, cols, rows, &lut, grid_tiles), || render_tiles(&src, 1, 1, &lut, thumb));
    }
    // SAFETY: `render_tiles` initializes every element of the slice it is given: it cuts it into planes of
    // PLANE = TILE * TILE elements, each plane into bands of whole TILE-element lines, and `normalize::line`
    // writes a whole line from a TILE-byte source. The two slices above partition the first `n` elements (the
    // thumbnail slice is empty when there is no thumbnail).
    unsafe { pixel_values.set_len(n) };
    Preprocessed { grid: (cols, rows), num_tiles, pixel_values, original_size: (w, h) }
}

const PLANE: usize = TILE * TILE;

/// Lines per parallel task when filling a tile.
const BAND: usize = 16;

/// The oriented image as the resize needs it.
struct Source<'a> {
    w: usize,
    h: usize,
    /// The three planes, present when a target width equals `w` (no horizontal pass).
    plain: &'a [Cow<'a, [u8]>],
    /// The three planes transposed, present when a target width differs from `w`.
    transposed: &'a [Vec<u8>],
}

/// Resizes the image to `cols*TILE` x `rows*TILE` and writes its tiles, row-major, normalized and planar, into
/// `out` (`cols * rows` tiles; nothing when `out` is empty). The vertical pass runs tile by tile, line by line,
/// and each resized line goes straight to its plane, so the full-size canvas is never stored.
fn render_tiles(src: &Source, cols: usize, rows: usize, lut: &[[f32; 256]; 3], out: &mut [MaybeUninit<f32>]) {
    if out.is_empty() {
        return;
    }
    let Source { w, h, plain, transposed } = *src;
    let (cw, ch) = (cols * TILE, rows * TILE);
    debug_assert!(if cw == w { plain.len() == 3 } else { transposed.len() == 3 }, "missing planes");
    let wide: Vec<Vec<u8>> =
        if cw != w { transposed.par_iter().map(|t| resize::horizontal(t, w, h, cw)).collect() } else { Vec::new() };
    let mid = |c: usize| -> &[u8] {
        match wide.get(c) {
            Some(p) => p,
            None => &plain[c],
        }
    };
    let taps = (ch != h).then(|| resize::Taps::new(h, ch));
    out.par_chunks_mut(PLANE).enumerate().for_each(|(i, plane)| {
        let (t, c) = (i / 3, i % 3);
        let (col, row) = (t % cols, t / cols);
        let lines = mid(c);
        plane.par_chunks_mut(BAND * TILE).enumerate().for_each_init(
            || (vec![0i32; TILE], vec![0u8; TILE]),
            |(acc, line), (k, band)| {
                for (j, dst) in band.chunks_mut(TILE).enumerate() {
                    let y = row * TILE + k * BAND + j;
                    let offset = col * TILE;
                    let v: &[u8] = match &taps {
                        Some(taps) => {
                            resize::combine(lines, cw, offset, taps, y, acc, line);
                            line
                        }
                        None => &lines[y * cw + offset..y * cw + offset + TILE],
                    };
                    normalize::line(v, &lut[c], dst);
                }
            },
        );
    });
}

//! `facellm preprocess`: run the image processor on one file and print a summary of the tiles as JSON.
//!
//!   facellm preprocess --image F [--max-tiles N] [--no-tiling] [--max-pixels N]
//!
//! The numbers are the ones tools/fixtures_images.py records from the HF reference (grid, tile count, per-channel
//! mean and population std over all tiles, the first 8 values of each tile), so the two can be compared by eye.

use std::path::PathBuf;

use anyhow::Context as _;
use facellm::image::{preprocess_file, ImageOptions, TILE};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// Image file (JPEG, PNG, WebP, BMP or GIF).
    #[arg(long)]
    image: PathBuf,
    /// Largest tile grid (1..=12); a thumbnail tile is added when the grid has more than one tile.
    #[arg(long, default_value_t = ImageOptions::default().max_tiles)]
    max_tiles: usize,
    /// One 448x448 tile of the whole image, aspect ratio squashed (the processor's crop_to_patches=False).
    #[arg(long)]
    no_tiling: bool,
    /// Refuse images with more pixels than this, before decoding them.
    #[arg(long, default_value_t = ImageOptions::default().max_pixels)]
    max_pixels: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = ImageOptions {
        tiling: !args.no_tiling,
        max_tiles: args.max_tiles,
        max_pixels: args.max_pixels,
        ..ImageOptions::default()
    };
    let pre = preprocess_file(&args.image, &opts).with_context(|| format!("preprocessing {}", args.image.display()))?;

    let plane = TILE * TILE;
    let n = (pre.num_tiles * plane) as f64;
    let mut mean = [0f64; 3];
    let mut std = [0f64; 3];
    for c in 0..3 {
        let channel = || pre.pixel_values.chunks(plane).skip(c).step_by(3).flatten().map(|&v| v as f64);
        mean[c] = channel().sum::<f64>() / n;
        std[c] = (channel().map(|v| (v - mean[c]).powi(2)).sum::<f64>() / n).sqrt();
    }
    let first8: Vec<&[f32]> = pre.pixel_values.chunks(3 * plane).map(|t| &t[..8]).collect();
    let out = json!({
        "image": args.image.display().to_string(),
        "width": pre.original_size.0,
        "height": pre.original_size.1,
        "grid": [pre.grid.0, pre.grid.1],
        "num_tiles": pre.num_tiles,
        "shape": pre.shape(),
        "mean": mean,
        "std": std,
        "first8": first8,
    });
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

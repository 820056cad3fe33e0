//! Optional wide check against HF on hundreds of random small inputs that are not committed (every JPEG
//! sampling / progressive / restart mix, sizes from 1 pixel, all EXIF orientations, more PNG/BMP/GIF/WebP modes):
//!
//!   tools/.venv/bin/python tools/fixtures_images.py --stress /tmp/stress 300
//!   FACELLM_IMAGE_STRESS=/tmp/stress cargo test --release --test image_stress -- --ignored --nocapture
//!
//! Tiling is off in the reference there (one squashed tile, so every input size reaches the resize); the tiled
//! grid is checked too. Prints every input that differs, then fails if any does by more than 2 levels.

use std::io::Read;
use std::path::{Path, PathBuf};

use facellm::image::{preprocess_file, ImageOptions, TILE};
use serde_json::Value;

const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

fn unfilter(res: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; res.len()];
    for (pin, p) in res.chunks(TILE * TILE).zip(out.chunks_mut(TILE * TILE)) {
        for y in 0..TILE {
            for x in 0..TILE {
                let a = if x > 0 { p[y * TILE + x - 1] as i32 } else { 0 };
                let b = if y > 0 { p[(y - 1) * TILE + x] as i32 } else { 0 };
                let c = if x > 0 && y > 0 { p[(y - 1) * TILE + x - 1] as i32 } else { 0 };
                let pred = if c >= a.max(b) {
                    a.min(b)
                } else if c <= a.min(b) {
                    a.max(b)
                } else {
                    a + b - c
                };
                p[y * TILE + x] = (pred + pin[y * TILE + x] as i32).rem_euclid(256) as u8;
            }
        }
    }
    out
}

/// Max level error and count of differing values between `ours` and the level file `levels` names.
fn compare(dir: &Path, levels: &Value, ours: &[f32]) -> (i32, usize) {
    let gz = std::fs::read(dir.join(levels.as_str().expect("levels name"))).expect("levels file");
    let mut res = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut res).expect("gunzip");
    let levels = unfilter(&res);
    if levels.len() != ours.len() {
        return (i32::MAX, levels.len().abs_diff(ours.len()));
    }
    let (mut max, mut nz) = (0i32, 0usize);
    for (i, (&x, &lv)) in ours.iter().zip(&levels).enumerate() {
        let c = (i / (TILE * TILE)) % 3;
        let v = (x as f64 * 255.0 * STD[c] + 255.0 * MEAN[c]).round() as i32;
        let d = (v - lv as i32).abs();
        max = max.max(d);
        nz += (d > 0) as usize;
    }
    (max, nz)
}

#[test]
#[ignore = "needs FACELLM_IMAGE_STRESS=<dir written by tools/fixtures_images.py --stress>"]
fn random_inputs_match_hf() {
    let Some(dir) = std::env::var_os("FACELLM_IMAGE_STRESS").map(PathBuf::from) else {
        eprintln!("FACELLM_IMAGE_STRESS not set; nothing to check");
        return;
    };
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("stress.json")).expect("stress.json"))
        .expect("parse stress.json");
    let untiled = ImageOptions { tiling: false, ..Default::default() };
    let (mut exact, mut worst, mut failed) = (0usize, 0i32, Vec::new());
    let images = meta["images"].as_array().expect("images");
    for img in images {
        let name = img["name"].as_str().unwrap_or("?");
        let desc = img["description"].as_str().unwrap_or("");
        let path: &Path = &dir.join(name);
        if let Some(e) = img.get("error") {
            let ours = preprocess_file(path, &untiled);
            println!("{name}: PIL refuses ({e}); ours: {}", if ours.is_ok() { "decodes" } else { "refuses" });
            continue;
        }
        let pre = match preprocess_file(path, &untiled) {
            Ok(p) => p,
            Err(e) => {
                println!("{name} ({desc}): ERROR {e}");
                failed.push(name.to_string());
                continue;
            }
        };
        let size = (img["width"].as_u64().unwrap_or(0) as usize, img["height"].as_u64().unwrap_or(0) as usize);
        let tiled_pre = preprocess_file(path, &ImageOptions::default()).ok();
        let tiled = tiled_pre.as_ref().map(|p| p.grid);
        let grid = (img["grid"][0].as_u64().unwrap_or(0) as usize, img["grid"][1].as_u64().unwrap_or(0) as usize);
        let (mut max, mut nz) = compare(&dir, &img["levels"], &pre.pixel_values);
        // Some inputs also carry the tiled reference.
        if let (Some(t), Some(p)) = (img.get("tiled_levels"), &tiled_pre) {
            let (m, z) = compare(&dir, t, &p.pixel_values);
            max = max.max(m);
            nz += z;
        }
        worst = worst.max(max);
        if max == 0 && pre.original_size == size && tiled == Some(grid) {
            exact += 1;
        } else {
            println!(
                "{name} ({desc}) {}x{}: max level error {max}, {nz} non-zero; size {:?} vs {size:?}; grid {tiled:?} vs {grid:?}",
                size.0, size.1, pre.original_size
            );
            if max > 2 || pre.original_size != size || tiled != Some(grid) {
                failed.push(name.to_string());
            }
        }
    }
    println!("{exact} of {} inputs bit-exact; worst level error {worst}", images.len());
    assert!(failed.is_empty(), "{} inputs off by more than 2 levels or wrong size/grid: {failed:?}", failed.len());
}

//! Every fixture of tests/fixtures/images/ (written by tools/fixtures_images.py from HF transformers 5.17 +
//! PIL) through `preprocess_file`: same grid and tile count, every pixel within 2 uint8 levels of the reference
//! (the goal and the current state is 0), the f32 values within the tolerance 2 levels imply, and bit-identical
//! to the reference's f32 arithmetic wherever the level matches.
//!
//! Run with `cargo test --test image_fixtures -- --nocapture` to see the per-image table of level errors.

use std::io::Read;
use std::path::{Path, PathBuf};

use facellm::image::{preprocess_file, ImageOptions, TILE};
use serde_json::Value;

const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];
/// Largest level difference tolerated anywhere.
const MAX_LEVEL_ERR: i32 = 2;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

fn fixtures() -> Value {
    let text = std::fs::read_to_string(dir().join("fixtures.json")).expect("tests/fixtures/images/fixtures.json");
    serde_json::from_str(&text).expect("fixtures.json parses")
}

/// Undoes the JPEG-LS median-edge prediction of tools/fixtures_images.py (`med_filter`), plane by plane.
fn read_levels(path: &Path, tiles: usize) -> Vec<u8> {
    let gz = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut res = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut res).expect("gunzip levels");
    assert_eq!(res.len(), tiles * 3 * TILE * TILE, "{}: level count", path.display());
    let mut out = vec![0u8; res.len()];
    for (plane_in, plane) in res.chunks(TILE * TILE).zip(out.chunks_mut(TILE * TILE)) {
        for y in 0..TILE {
            for x in 0..TILE {
                let a = if x > 0 { plane[y * TILE + x - 1] as i32 } else { 0 };
                let b = if y > 0 { plane[(y - 1) * TILE + x] as i32 } else { 0 };
                let c = if x > 0 && y > 0 { plane[(y - 1) * TILE + x - 1] as i32 } else { 0 };
                let pred = if c >= a.max(b) {
                    a.min(b)
                } else if c <= a.min(b) {
                    a.max(b)
                } else {
                    a + b - c
                };
                plane[y * TILE + x] = (pred + plane_in[y * TILE + x] as i32).rem_euclid(256) as u8;
            }
        }
    }
    out
}

fn level_of(x: f32, c: usize) -> i32 {
    (x as f64 * 255.0 * STD[c] + 255.0 * MEAN[c]).round() as i32
}

fn value_of(level: u8, c: usize) -> f64 {
    (level as f64 - 255.0 * MEAN[c]) / (255.0 * STD[c])
}

/// The reference's own f32 arithmetic on a level (tools/fixtures_images.py checks it returns HF's pixel_values
/// bit for bit): torch.tensor(mean) * 255.0 in f32, then (x - mean) / std in f32.
fn reference_f32(level: u8, c: usize) -> f32 {
    let (m, s) = ([0.485f32, 0.456, 0.406][c] * 255.0, [0.229f32, 0.224, 0.225][c] * 255.0);
    (level as f32 - m) / s
}

struct Report {
    name: String,
    max_level_err: i32,
    nonzero: usize,
    max_abs_err: f64,
    /// Pixels whose level matches but whose f32 value is not bit-identical to the reference's.
    inexact: usize,
    first_bad: Option<String>,
}

fn check_one(img: &Value) -> Report {
    let name = img["name"].as_str().expect("name").to_string();
    let path = dir().join(&name);
    let pre = preprocess_file(&path, &ImageOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));

    let grid = (img["grid"][0].as_u64().unwrap_or(0) as usize, img["grid"][1].as_u64().unwrap_or(0) as usize);
    let tiles = img["num_tiles"].as_u64().unwrap_or(0) as usize;
    assert_eq!(pre.grid, grid, "{name}: grid (cols, rows)");
    assert_eq!(pre.num_tiles, tiles, "{name}: num_tiles");
    let shape: Vec<usize> =
        img["shape"].as_array().expect("shape").iter().map(|v| v.as_u64().unwrap_or(0) as usize).collect();
    assert_eq!(pre.shape().to_vec(), shape, "{name}: shape");
    assert_eq!(pre.pixel_values.len(), tiles * 3 * TILE * TILE);
    let size = (img["width"].as_u64().unwrap_or(0) as usize, img["height"].as_u64().unwrap_or(0) as usize);
    assert_eq!(pre.original_size, size, "{name}: size after EXIF orientation");

    let levels = read_levels(&dir().join(img["levels"].as_str().expect("levels")), tiles);
    let mut rep =
        Report { name: name.clone(), max_level_err: 0, nonzero: 0, max_abs_err: 0.0, inexact: 0, first_bad: None };
    for (i, (&x, &lv)) in pre.pixel_values.iter().zip(&levels).enumerate() {
        let c = (i / (TILE * TILE)) % 3;
        let d = (level_of(x, c) - lv as i32).abs();
        if d == 0 && x.to_bits() != reference_f32(lv, c).to_bits() {
            rep.inexact += 1;
        }
        if d > 0 {
            rep.nonzero += 1;
            if d > rep.max_level_err {
                rep.max_level_err = d;
                let (t, y, xx) = (i / (3 * TILE * TILE), (i / TILE) % TILE, i % TILE);
                rep.first_bad = Some(format!("tile {t} channel {c} y {y} x {xx}: ours {} ref {lv}", level_of(x, c)));
            }
        }
        rep.max_abs_err = rep.max_abs_err.max((x as f64 - value_of(lv, c)).abs());
    }
    // Tolerance on values implied by the level tolerance (the widest channel step is 1/(255*0.224)), plus the
    // f32 rounding of the reference.
    let tol = MAX_LEVEL_ERR as f64 / (255.0 * 0.224) + 1e-5;
    assert!(
        rep.max_level_err <= MAX_LEVEL_ERR && rep.max_abs_err <= tol && rep.inexact == 0,
        "{name}: max level error {} ({} non-zero), max |x - ref| {:.3e} (tol {tol:.3e}), {} equal-level values \
         not bit-identical; worst at {}",
        rep.max_level_err,
        rep.nonzero,
        rep.max_abs_err,
        rep.inexact,
        rep.first_bad.as_deref().unwrap_or("-")
    );

    // The summary numbers the CLI prints.
    for t in 0..tiles {
        let want: Vec<f64> =
            img["first8"][t].as_array().expect("first8").iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect();
        let got = &pre.pixel_values[t * 3 * TILE * TILE..t * 3 * TILE * TILE + 8];
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= tol, "{name}: tile {t} first8 {got:?} vs {want:?}");
        }
    }
    for c in 0..3 {
        let vals = pre.pixel_values.chunks(TILE * TILE).skip(c).step_by(3).flatten();
        let n = (tiles * TILE * TILE) as f64;
        let mean = vals.clone().map(|&v| v as f64).sum::<f64>() / n;
        let var = vals.map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let (wm, ws) = (img["mean"][c].as_f64().unwrap_or(f64::NAN), img["std"][c].as_f64().unwrap_or(f64::NAN));
        assert!((mean - wm).abs() < 1e-3 && (var.sqrt() - ws).abs() < 1e-3, "{name}: channel {c} mean/std");
    }
    rep
}

#[test]
fn every_fixture_matches_the_reference() {
    let fx = fixtures();
    let images = fx["images"].as_array().expect("images");
    assert!(images.len() >= 10);
    let mut failures = Vec::new();
    println!("{:<44} {:>6} {:>9} {:>10} {:>8}", "image", "maxlvl", "nonzero", "max|dx|", "inexact");
    for img in images {
        let name = img["name"].as_str().unwrap_or("?").to_string();
        match std::panic::catch_unwind(|| check_one(img)) {
            Ok(r) => println!(
                "{:<44} {:>6} {:>9} {:>10.2e} {:>8}",
                r.name, r.max_level_err, r.nonzero, r.max_abs_err, r.inexact
            ),
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{name}: panic"));
                println!("{name:<44} FAILED");
                failures.push(msg);
            }
        }
    }
    assert!(failures.is_empty(), "{} fixture(s) failed:\n{}", failures.len(), failures.join("\n"));
}

//! The dynamic tiling grid of `get_optimal_tiled_canvas` (transformers, got_ocr2), MODEL_SPEC.md section 4.
//!
//! Candidates (cols, rows) with min <= cols*rows <= max are listed cols-major, rows-minor, then stably sorted by
//! tile count. The grid whose cols/rows is closest to the image's width/height wins; on an exact tie (float ==)
//! a later candidate replaces the current best only when the image area exceeds half the candidate's canvas area,
//! so small images keep few tiles. Everything is computed in f64 exactly as Python does: the ratios are
//! correctly rounded divisions of integers, and the area test is done in integers (Python compares an int with
//! an exactly representable float, which is the same thing).

use super::TILE;

/// Returns (cols, rows) for an image of `width` x `height` pixels.
pub(crate) fn grid(width: usize, height: usize, min_tiles: usize, max_tiles: usize) -> (usize, usize) {
    let mut candidates = Vec::new();
    for c in 1..=max_tiles {
        for r in 1..=max_tiles {
            let n = c * r;
            if n >= min_tiles && n <= max_tiles {
                candidates.push((c, r));
            }
        }
    }
    candidates.sort_by_key(|&(c, r)| c * r);

    let aspect = width as f64 / height as f64;
    let area = width as u128 * height as u128;
    let mut best = (1, 1);
    let mut best_diff = f64::INFINITY;
    for (c, r) in candidates {
        let diff = (aspect - c as f64 / r as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (c, r);
        } else if diff == best_diff && 2 * area > (TILE * TILE * c * r) as u128 {
            best = (c, r);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_images_grow_with_area() {
        // (1,1), (2,2), (3,3) all match a square exactly; each larger grid needs area > half its canvas.
        assert_eq!(grid(224, 224, 1, 12), (1, 1));
        assert_eq!(grid(633, 633, 1, 12), (1, 1)); // 400689 <= 401408 = 0.5 * 448^2 * 4
        assert_eq!(grid(634, 634, 1, 12), (2, 2)); // 401956 > 401408
        assert_eq!(grid(950, 950, 1, 12), (2, 2)); // 902500 <= 903168 = 0.5 * 448^2 * 9
        assert_eq!(grid(951, 951, 1, 12), (3, 3));
        assert_eq!(grid(1024, 1024, 1, 12), (3, 3)); // MODEL_SPEC example: 9 tiles + thumbnail
        assert_eq!(grid(4000, 4000, 1, 12), (3, 3)); // (4,4) has 16 tiles
    }

    #[test]
    fn area_rule_breaks_exact_ties_only() {
        // 2:1 images: (2,1) and (4,2) match exactly; (4,2) needs area > 0.5 * 448^2 * 8 = 802816.
        assert_eq!(grid(896, 448, 1, 12), (2, 1));
        assert_eq!(grid(1267, 633, 1, 12), (2, 1)); // 802011
        assert_eq!(grid(1268, 634, 1, 12), (4, 2)); // 803912
                                                    // 3:1: (3,1) exact, (6,2) needs area > 602112.
        assert_eq!(grid(1200, 400, 1, 12), (3, 1));
        assert_eq!(grid(448, 896, 1, 12), (1, 2));
        assert_eq!(grid(896, 224, 1, 12), (4, 1));
    }

    #[test]
    fn exact_ratio_beats_area() {
        // A closer ratio always wins, however small the image: no area test unless diffs are equal.
        assert_eq!(grid(5, 7, 1, 12), (3, 4));
        assert_eq!(grid(320, 240, 1, 12), (4, 3));
        assert_eq!(grid(2000, 60, 1, 12), (12, 1));
        assert_eq!(grid(60, 2000, 1, 12), (1, 12));
    }

    #[test]
    fn max_tiles_bounds_the_grid() {
        assert_eq!(grid(1024, 1024, 1, 1), (1, 1));
        assert_eq!(grid(1024, 1024, 1, 4), (2, 2));
        assert_eq!(grid(2000, 60, 1, 6), (6, 1));
        assert_eq!(grid(640, 376, 1, 12), (3, 2));
    }

    #[test]
    fn min_tiles_excludes_small_grids() {
        assert_eq!(grid(224, 224, 4, 12), (2, 2));
        assert_eq!(grid(224, 224, 2, 12), (2, 2)); // (1,2), (2,1) are 0.5 off; (2,2) is exact
        assert_eq!(grid(1000, 1000, 2, 12), (3, 3));
    }
}

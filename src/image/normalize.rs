//! Fused rescale + normalize, bit-identical to the reference: transformers folds rescale_factor = 1/255 into
//! mean and std (`tensor([0.485, ...]) * 255.0`, computed in f32), then torchvision's normalize does
//! `(x.float() - mean) / std` in f32 with a true division. With uint8 inputs there are only 256 values per
//! channel, so a table per channel gives exactly those f32 results.

use std::mem::MaybeUninit;

pub(crate) const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub(crate) const STD: [f32; 3] = [0.229, 0.224, 0.225];

pub(crate) fn tables() -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, table) in t.iter_mut().enumerate() {
        let mean = MEAN[c] * 255.0f32;
        let std = STD[c] * 255.0f32;
        for (v, x) in table.iter_mut().enumerate() {
            *x = (v as f32 - mean) / std;
        }
    }
    t
}

/// One resized line of a channel plane -> the same line of its normalized plane.
#[inline]
pub(crate) fn line(v: &[u8], lut: &[f32; 256], out: &mut [MaybeUninit<f32>]) {
    for (o, &x) in out.iter_mut().zip(v) {
        o.write(lut[x as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_constants_match_torch_f32() {
        // torch.tensor([0.485, 0.456, 0.406]) * 255.0 and the std equivalent, printed by torch 2.11 as
        // [123.67500305175781, 116.27999877929688, 103.52999877929688] and [58.39500045776367, 57.12000274658203,
        // 57.375]; compared as f64 so the literals keep every printed digit.
        let mean: Vec<f64> = MEAN.iter().map(|m| (m * 255.0) as f64).collect();
        let std: Vec<f64> = STD.iter().map(|s| (s * 255.0) as f64).collect();
        assert_eq!(mean, [123.67500305175781, 116.27999877929688, 103.52999877929688]);
        assert_eq!(std, [58.39500045776367, 57.12000274658203, 57.375]);
    }
}

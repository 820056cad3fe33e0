//! How a model that keeps its KV cache on a device splits one batched pass (`BatchModel::device_kv`): the
//! inputs that are one token after a non-empty cache go to one decode step (replayable from a CUDA graph),
//! the rest to one prefill step, whose image rows are packed here in step order. Device-independent, so the
//! split is tested without a GPU.

use crate::model::facellm::BatchInput;
use crate::{Error, Result};

/// The plan of one pass.
#[derive(Debug, Default, PartialEq)]
pub struct DevicePass {
    /// Inputs (indices) decoded together: one token each, a non-empty cache, no image features.
    pub decode: Vec<usize>,
    /// Inputs prefilled together, their tokens laid out one after another in this order.
    pub prefill: Vec<usize>,
    /// Row of the prefill step (0-based over the packed tokens) of each image token, in order.
    pub image_rows: Vec<i32>,
    /// One feature row of `hidden` values per entry of `image_rows`.
    pub features: Vec<f32>,
}

/// Splits `inputs` (with `held[i]` tokens already cached for input `i`) into a decode and a prefill step and
/// packs the prefill step's image feature rows. Every image token of a prefill input needs its feature row
/// (`BatchInput::features` holds one per image token among its ids, in order); anything else is an error
/// naming the input.
pub fn plan_device_pass(
    inputs: &[BatchInput],
    held: &[usize],
    image_token_id: u32,
    hidden: usize,
) -> Result<DevicePass> {
    if held.len() != inputs.len() {
        return Err(Error::Invalid(format!("device pass: {} inputs but {} cache lengths", inputs.len(), held.len())));
    }
    let mut pass = DevicePass::default();
    for (i, inp) in inputs.iter().enumerate() {
        if inp.ids.is_empty() {
            return Err(Error::Invalid(format!("device pass: input {i} has no tokens")));
        }
        let decode = inp.ids.len() == 1 && held[i] > 0 && inp.features.is_none() && inp.ids[0] != image_token_id;
        if decode {
            pass.decode.push(i);
        } else {
            pass.prefill.push(i);
        }
    }
    let mut offset = 0usize;
    for &i in &pass.prefill {
        let inp = &inputs[i];
        let images = inp.ids.iter().filter(|&&t| t == image_token_id).count();
        match inp.features {
            Some(f) if f.shape() == [images, hidden] => {
                for (r, _) in inp.ids.iter().enumerate().filter(|&(_, &t)| t == image_token_id) {
                    let row = i32::try_from(offset + r)
                        .map_err(|_| Error::Invalid("device pass: more than 2^31 tokens in one step".into()))?;
                    pass.image_rows.push(row);
                }
                pass.features.extend_from_slice(f.f32s()?);
            }
            Some(f) => {
                return Err(Error::Invalid(format!(
                    "device pass: input {i} has features {:?} for {images} image tokens of hidden {hidden}",
                    f.shape()
                )))
            }
            None if images > 0 => {
                return Err(Error::Invalid(format!("device pass: input {i} has {images} image tokens and no features")))
            }
            None => {}
        }
        offset += inp.ids.len();
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    const IMG: u32 = 9;

    fn input<'a>(ids: &'a [u32], features: Option<&'a Tensor>) -> BatchInput<'a> {
        BatchInput { ids, features, logits: true, greedy: true }
    }

    #[test]
    fn decode_and_prefill_rows_are_split_and_image_rows_packed_in_step_order() {
        let f_a = Tensor::from_f32([2, 3], vec![1., 2., 3., 4., 5., 6.]).expect("tensor");
        let f_c = Tensor::from_f32([1, 3], vec![7., 8., 9.]).expect("tensor");
        let (a, b, c, d, e) = ([5, IMG, IMG, 6], [7], [IMG], [8], [1, 2, 3]);
        let inputs = [
            input(&a, Some(&f_a)), // prefill, rows 1 and 2
            input(&b, None),       // decode
            input(&c, Some(&f_c)), // one image token after a cache: still a prefill (row 4, after a's 4 rows)
            input(&d, None),       // first token of an empty cache: prefill (row 5)
            input(&e, None),       // text prefill after a cache (rows 6..9)
        ];
        let pass = plan_device_pass(&inputs, &[0, 10, 3, 0, 4], IMG, 3).expect("plan");
        assert_eq!(pass.decode, [1]);
        assert_eq!(pass.prefill, [0, 2, 3, 4]);
        assert_eq!(pass.image_rows, [1, 2, 4]);
        assert_eq!(pass.features, [1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    }

    #[test]
    fn missing_or_misshapen_features_and_bad_inputs_are_errors() {
        let f = Tensor::from_f32([1, 3], vec![0.; 3]).expect("tensor");
        let two = [IMG, IMG];
        let err = |inputs: &[BatchInput], held: &[usize]| {
            plan_device_pass(inputs, held, IMG, 3).expect_err("refused").to_string()
        };
        assert!(err(&[input(&two, None)], &[0]).contains("2 image tokens and no features"));
        assert!(err(&[input(&two, Some(&f))], &[0]).contains("features [1, 3] for 2 image tokens"));
        assert!(err(&[input(&[], None)], &[0]).contains("no tokens"));
        assert!(err(&[input(&two, None)], &[]).contains("1 inputs but 0 cache lengths"));
        // Features for text only: also a mismatch.
        assert!(err(&[input(&[1, 2], Some(&f))], &[0]).contains("for 0 image tokens"));
    }
}

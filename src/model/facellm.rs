//! FaceLLM = vision tower + projector + Qwen2, glued by the image-token scatter (MODEL_SPEC §3.7): the
//! projector's features replace, in order, the embeddings at every `<IMG_CONTEXT>` position.

use super::llm::{BatchKvStore, KvCache, Qwen2, TextParams, Trace};
use super::projector::Projector;
use super::vision::{VisionParams, VisionTower};
use super::Weights;
use crate::backend;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What the vision side produced for a batch of tiles.
pub struct ImageFeatures {
    /// Vision tower last hidden state `[tiles, 1 + g*g, h]`.
    pub vision_out: Tensor,
    /// After pixel shuffle `[tiles, (g/2)^2, 4h]`.
    pub shuffled: Tensor,
    /// Projector output `[tiles * (g/2)^2, D]`: one row per `<IMG_CONTEXT>` token.
    pub features: Tensor,
}

/// One sequence's part of a batched pass (`FaceLlm::forward_batch`).
pub struct BatchInput<'a> {
    /// The tokens after what the sequence's cache holds (a prefill chunk, or the one token of a decode step).
    pub ids: &'a [u32],
    /// One feature row per `<IMG_CONTEXT>` token among `ids`, in order.
    pub features: Option<&'a Tensor>,
    /// Whether the logits of the last token are wanted (false for a prefill chunk that is not the last).
    pub logits: bool,
    /// The caller will take the plain argmax of those logits: a device model may hand back the argmax
    /// alone and skip copying the row to the host (`engine::batch::BatchOutput`).
    pub greedy: bool,
}

pub struct FaceLlm {
    vision: Option<(VisionTower, Projector)>,
    llm: Qwen2,
    image_token_id: u32,
}

impl FaceLlm {
    /// A full FaceLLM (`vision = Some`) or a text-only Qwen2 (`None`).
    pub fn load(
        w: &dyn Weights,
        vision: Option<&VisionParams>,
        text: &TextParams,
        image_token_id: u32,
    ) -> Result<FaceLlm> {
        let vision = match vision {
            Some(vp) => Some((VisionTower::load(w, vp)?, Projector::load(w, vp.hidden, text.hidden)?)),
            None => None,
        };
        let llm = Qwen2::load(w, text, "model.language_model")?;
        Ok(FaceLlm { vision, llm, image_token_id })
    }

    pub fn llm(&self) -> &Qwen2 {
        &self.llm
    }

    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.llm.params())
    }

    /// Tiles `[n, 3, 448, 448]` -> features, with the intermediate tensors kept for inspection.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<ImageFeatures> {
        let Some((tower, projector)) = &self.vision else {
            return Err(Error::Invalid("this checkpoint has no vision tower; it cannot take images".into()));
        };
        let vision_out = tower.forward(pixel_values)?;
        let (shuffled, features) = projector.forward(&vision_out)?;
        Ok(ImageFeatures { vision_out, shuffled, features })
    }

    /// Embeddings of `ids` with image features scattered at the `<IMG_CONTEXT>` positions. The number of
    /// such positions must equal the number of feature rows (HF raises the same way). Without features every
    /// id keeps its token embedding, as in HF without `pixel_values` (a decode step that sampled
    /// `<IMG_CONTEXT>` embeds it like any other token).
    pub fn embed_prompt(&self, ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        let Some(f) = features else { return self.llm.embed(ids) };
        let count = ids.iter().filter(|&&id| id == self.image_token_id).count();
        if count != f.shape()[0] {
            return Err(Error::Invalid(format!(
                "the prompt has {count} image tokens but the images give {} feature rows",
                f.shape()[0]
            )));
        }
        self.embed_chunk(ids, Some(f))
    }

    /// Embeddings of a chunk of a sequence: the feature rows replace, in order, the first `rows` of its
    /// `<IMG_CONTEXT>` tokens (the prompt's); a later one (generated, in a chunk recomputed after a
    /// preemption) keeps its token embedding. Fewer image tokens than rows is an error.
    pub fn embed_chunk(&self, ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        let mut e = self.llm.embed(ids)?;
        let Some(f) = features else { return Ok(e) };
        let want = f.shape()[0];
        let rows: Vec<usize> =
            ids.iter().enumerate().filter(|(_, &id)| id == self.image_token_id).map(|(i, _)| i).take(want).collect();
        if rows.len() != want {
            return Err(Error::Invalid(format!(
                "the chunk has {} image tokens but {want} feature rows were given",
                rows.len()
            )));
        }
        if !rows.is_empty() {
            backend::scatter_rows(&mut e, &rows, f)?;
        }
        Ok(e)
    }

    /// Runs every sequence's `inputs[i].ids` in one pass (`Qwen2::forward_batch`, `row_invariant` as
    /// there), with keys and values in `kv` (one store per input, same order). Returns logits `[n, vocab]`
    /// of the last token of each input that asks for them, in order (`None` when none does): the lm_head,
    /// too, runs once for the batch.
    pub fn forward_batch(
        &self,
        inputs: &[BatchInput],
        kv: &mut dyn BatchKvStore,
        row_invariant: bool,
    ) -> Result<Option<Tensor>> {
        let d = self.llm.params().hidden;
        let total: usize = inputs.iter().map(|i| i.ids.len()).sum();
        let mut rows = Vec::with_capacity(total * d);
        let mut lens = Vec::with_capacity(inputs.len());
        for (n, input) in inputs.iter().enumerate() {
            if input.ids.is_empty() {
                return Err(Error::Invalid(format!("forward_batch: input {n} has no tokens")));
            }
            rows.extend_from_slice(self.embed_chunk(input.ids, input.features)?.f32s()?);
            lens.push(input.ids.len());
        }
        let h = self.llm.forward_batch(Tensor::from_f32([total, d], rows)?, &lens, kv, row_invariant, None)?;
        let h = h.f32s()?;
        let mut last = Vec::new();
        let mut end = 0;
        for (input, len) in inputs.iter().zip(&lens) {
            end += len;
            if input.logits {
                last.extend_from_slice(&h[(end - 1) * d..end * d]);
            }
        }
        if last.is_empty() {
            return Ok(None);
        }
        let last = Tensor::from_f32([last.len() / d, d], last)?;
        Ok(Some(if row_invariant { self.llm.logits_row_invariant(&last)? } else { self.llm.logits(&last)? }))
    }

    /// Runs `ids` (the tokens after what `cache` holds) and returns logits `[ids.len(), vocab]` when
    /// `all_logits`, else `[1, vocab]` for the last token only.
    pub fn forward(
        &self,
        ids: &[u32],
        features: Option<&Tensor>,
        cache: &mut KvCache,
        all_logits: bool,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::Invalid("empty prompt".into()));
        }
        let e = self.embed_prompt(ids, features)?;
        let h = self.llm.forward(e, cache, trace)?;
        if all_logits {
            return self.llm.logits(&h);
        }
        let d = h.shape()[1];
        let last = h.f32s()?[(ids.len() - 1) * d..].to_vec();
        self.llm.logits(&Tensor::from_f32([1, d], last)?)
    }
}

//! FaceLLM = vision tower + projector + Qwen2, glued by the image-token scatter (MODEL_SPEC §3.7): the
//! projector's features replace, in order, the embeddings at every `<IMG_CONTEXT>` position.

use super::llm::{KvCache, Qwen2, TextParams, Trace};
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
    /// such positions must equal the number of feature rows (HF raises the same way).
    pub fn embed_prompt(&self, ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        let mut e = self.llm.embed(ids)?;
        let rows: Vec<usize> =
            ids.iter().enumerate().filter(|(_, &id)| id == self.image_token_id).map(|(i, _)| i).collect();
        let have = features.map_or(0, |f| f.shape()[0]);
        if rows.len() != have {
            return Err(Error::Invalid(format!(
                "the prompt has {} image tokens but the images give {have} feature rows",
                rows.len()
            )));
        }
        if let Some(f) = features {
            if !rows.is_empty() {
                backend::scatter_rows(&mut e, &rows, f)?;
            }
        }
        Ok(e)
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

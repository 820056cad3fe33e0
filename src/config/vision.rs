//! The InternViT vision tower config and the InternVL top level (MODEL_SPEC §1.1, §1.2). Defaults are
//! transformers' `InternVLVisionConfig` / `InternVLConfig` ones.

use serde::Serialize;

use super::fields::Obj;
use super::text::positive;
use super::{Activation, NormType, TextConfig};
use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub norm_type: NormType,
    pub layer_norm_eps: f64,
    /// `[height, width]`; an int in the file means a square.
    pub image_size: [usize; 2],
    pub patch_size: [usize; 2],
    pub num_channels: usize,
    /// q/k/v projection biases (InternViT-300M yes, 6B no). The output projection always has one.
    pub attention_bias: bool,
    /// RMSNorm over the full q and k width before the head split (InternViT-6B).
    pub use_qk_norm: bool,
    pub layer_scale_init_value: f64,
    pub use_mean_pooling: bool,
    pub use_absolute_position_embeddings: bool,
    /// Adds an `embeddings.mask_token` tensor (unused at inference).
    pub use_mask_token: bool,
    pub attention_dropout: f64,
    pub projection_dropout: f64,
    pub hidden_dropout_prob: f64,
    pub initializer_range: f64,
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InternVlConfig {
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
    /// `<IMG_CONTEXT>`, the placeholder whose embeddings are replaced by image features.
    pub image_token_id: u32,
    /// Placeholder tokens per 448px tile; checked equal to what the vision geometry produces.
    pub image_seq_length: usize,
    pub downsample_ratio: f64,
    pub projector_hidden_act: Activation,
    pub vision_feature_layer: i64,
    pub vision_feature_select_strategy: String,
    /// Top-level value as stated in the file (None when absent); see `ModelConfig::tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
    pub dtype: Option<String>,
}

impl VisionConfig {
    fn parse(o: &Obj) -> Result<Self> {
        let c = VisionConfig {
            hidden_size: o.usize_or("hidden_size", 1024)?,
            num_hidden_layers: o.usize_or("num_hidden_layers", 24)?,
            num_attention_heads: o.usize_or("num_attention_heads", 16)?,
            intermediate_size: o.usize_or("intermediate_size", 4096)?,
            hidden_act: Activation::parse(o, "hidden_act", o.str_or("hidden_act", "gelu")?)?,
            norm_type: match o.str_or("norm_type", "layer_norm")? {
                "layer_norm" => NormType::LayerNorm,
                "rms_norm" => NormType::RmsNorm,
                other => {
                    return Err(
                        o.err("norm_type", format!("unknown norm type `{other}` (supported: layer_norm, rms_norm)"))
                    )
                }
            },
            layer_norm_eps: o.f64_or("layer_norm_eps", 1e-6)?,
            image_size: o.size2_or("image_size", [448, 448])?,
            patch_size: o.size2_or("patch_size", [14, 14])?,
            num_channels: o.usize_or("num_channels", 3)?,
            attention_bias: o.bool_or("attention_bias", false)?,
            use_qk_norm: o.bool_or("use_qk_norm", false)?,
            layer_scale_init_value: o.f64_or("layer_scale_init_value", 0.1)?,
            use_mean_pooling: o.bool_or("use_mean_pooling", true)?,
            use_absolute_position_embeddings: o.bool_or("use_absolute_position_embeddings", true)?,
            use_mask_token: o.bool_or("use_mask_token", false)?,
            attention_dropout: o.f64_or("attention_dropout", 0.0)?,
            projection_dropout: o.f64_or("projection_dropout", 0.0)?,
            hidden_dropout_prob: o.f64_or("hidden_dropout_prob", 0.0)?,
            initializer_range: o.f64_or("initializer_range", 0.02)?,
            dtype: o.dtype()?,
        };
        c.validate(o)?;
        Ok(c)
    }

    fn validate(&self, o: &Obj) -> Result<()> {
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_channels", self.num_channels),
        ] {
            if v == 0 {
                return Err(o.err(key, "must be > 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(o.err(
                "num_attention_heads",
                format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if !positive(self.layer_norm_eps) {
            return Err(o.err("layer_norm_eps", format!("{} must be > 0", self.layer_norm_eps)));
        }
        let [ih, iw] = self.image_size;
        let [ph, pw] = self.patch_size;
        if ph == 0 || pw == 0 {
            return Err(o.err("patch_size", "must be > 0"));
        }
        if ih == 0 || iw == 0 || ih % ph != 0 || iw % pw != 0 {
            return Err(o.err("image_size", format!("{ih}x{iw} is not a whole number of {ph}x{pw} patches")));
        }
        // Feature selection reshapes the patch tokens to a square grid, and the 0.5 pixel shuffle pairs rows and
        // columns: the grid must be square with an even side.
        let (gh, gw) = (ih / ph, iw / pw);
        if gh != gw || gh % 2 != 0 {
            return Err(o.err(
                "image_size",
                format!("the patch grid {gh}x{gw} must be square with an even side for the 0.5 pixel shuffle"),
            ));
        }
        if !self.use_mean_pooling {
            return Err(o.err(
                "use_mean_pooling",
                "false adds a final vision LayerNorm (`vision_tower.layernorm`) that facellm does not implement; \
                 InternVL3 uses true",
            ));
        }
        if !self.use_absolute_position_embeddings {
            return Err(o.err("use_absolute_position_embeddings", "false is not supported (InternViT uses true)"));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patch rows and columns of one tile (32 x 32 for 448/14).
    pub fn patch_grid(&self) -> [usize; 2] {
        [self.image_size[0] / self.patch_size[0], self.image_size[1] / self.patch_size[1]]
    }

    pub fn num_patches(&self) -> usize {
        let [h, w] = self.patch_grid();
        h * w
    }

    /// Tokens per tile inside the tower: patches plus CLS (1025 for 448/14).
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }
}

impl InternVlConfig {
    pub(crate) fn parse(o: &Obj) -> Result<Self> {
        let vision_config = match o.sub("vision_config")? {
            Some(v) => VisionConfig::parse(&v)?,
            None => VisionConfig::parse(&Obj::root(o.file(), &empty_object())?)?,
        };
        let text_config = match o.sub("text_config")? {
            Some(t) => {
                let text_type = t.str_or("model_type", "qwen2")?;
                if text_type != "qwen2" {
                    return Err(
                        t.err("model_type", format!("unsupported language model `{text_type}` (supported: qwen2)"))
                    );
                }
                TextConfig::parse(&t)?
            }
            None => TextConfig::parse(&Obj::root(o.file(), &empty_object())?)?,
        };
        let vision_feature_layer = match o.get("vision_feature_layer") {
            Some(serde_json::Value::Array(_)) => {
                return Err(o.err("vision_feature_layer", "a list of layers is not supported (only -1, the last layer)"))
            }
            _ => o.i64_or("vision_feature_layer", -1)?,
        };
        let c = InternVlConfig {
            image_token_id: o.u32_or("image_token_id", 151_667)?,
            image_seq_length: o.usize_or("image_seq_length", 256)?,
            downsample_ratio: o.f64_or("downsample_ratio", 0.5)?,
            projector_hidden_act: Activation::parse(
                o,
                "projector_hidden_act",
                o.str_or("projector_hidden_act", "gelu")?,
            )?,
            vision_feature_layer,
            vision_feature_select_strategy: o.str_or("vision_feature_select_strategy", "default")?.to_string(),
            tie_word_embeddings: match o.get("tie_word_embeddings") {
                None => None,
                Some(_) => Some(o.bool_or("tie_word_embeddings", true)?),
            },
            dtype: o.dtype()?,
            vision_config,
            text_config,
        };
        c.validate(o)?;
        Ok(c)
    }

    fn validate(&self, o: &Obj) -> Result<()> {
        if self.downsample_ratio != 0.5 {
            return Err(o.err(
                "downsample_ratio",
                format!("{} is not supported (the pixel shuffle implements 0.5 only)", self.downsample_ratio),
            ));
        }
        if self.vision_feature_layer != -1 {
            return Err(o.err(
                "vision_feature_layer",
                format!("{} is not supported (only -1, the last layer)", self.vision_feature_layer),
            ));
        }
        // "full" keeps CLS: 1 + grid^2 tokens cannot be reshaped to the square grid the pixel shuffle needs
        // (transformers fails there too), so only "default" (drop CLS) can run.
        if self.vision_feature_select_strategy != "default" {
            return Err(o.err(
                "vision_feature_select_strategy",
                format!("`{}` is not supported (only `default`, which drops CLS)", self.vision_feature_select_strategy),
            ));
        }
        let tokens = self.tokens_per_tile();
        if self.image_seq_length != tokens {
            return Err(o.err(
                "image_seq_length",
                format!("{} but the vision geometry gives {tokens} tokens per tile", self.image_seq_length),
            ));
        }
        if self.image_token_id as usize >= self.text_config.vocab_size {
            return Err(o.err(
                "image_token_id",
                format!("{} is outside the text vocabulary ({})", self.image_token_id, self.text_config.vocab_size),
            ));
        }
        Ok(())
    }

    /// LLM tokens per tile after the 0.5 pixel shuffle (256 for 448/14).
    pub fn tokens_per_tile(&self) -> usize {
        self.vision_config.num_patches() / 4
    }

    /// Channels after the pixel shuffle: 4 x vision hidden (the projector's input width).
    pub fn projector_in_dim(&self) -> usize {
        self.vision_config.hidden_size * 4
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

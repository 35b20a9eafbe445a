//! CLIP token ids → the text encoder's last hidden state (SD 1.5 conditions the UNet on all 77
//! positions after the final layer norm). The ids come from [`super::tokenizer`].
//!
//! Weights load with transformers' names with or without the `text_model.` prefix (transformers
//! 5 saves `CLIPTextModel` without it), or under any outer prefix such as a single-file
//! checkpoint's `cond_stage_model.transformer.`.

use std::collections::HashMap;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use serde::Deserialize;

use crate::weights::{self, LoadError};

fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "quick_gelu".into()
}

/// The fields of a transformers `CLIPTextConfig` (`text_encoder/config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub projection_dim: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    pub(crate) fn to_candle(&self) -> Result<ClipTextConfig, String> {
        if self.hidden_act != "quick_gelu" {
            return Err(format!("hidden_act `{}` is not supported (only quick_gelu, as in SD 1.x)", self.hidden_act));
        }
        // candle's CLIP has its layer norms' epsilon fixed at 1e-5.
        if (self.layer_norm_eps - 1e-5).abs() > 1e-12 {
            return Err(format!("layer_norm_eps {} is not supported (only 1e-5)", self.layer_norm_eps));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!("hidden_size {} is not divisible by num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        Ok(ClipTextConfig {
            vocab_size: self.vocab_size,
            embed_dim: self.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            projection_dim: self.projection_dim,
        })
    }
}

/// The CLIP text encoder, returning the last hidden state after the final layer norm.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    model: ClipTextTransformer,
    context: usize,
}

impl TextEncoder {
    /// Builds from transformers' tensor names (`embeddings.…`, `encoder.…`, `final_layer_norm.…`)
    /// under whatever prefix the file uses (`text_model.`, none, …), reporting all problems at
    /// once.
    pub fn build(
        config: &ClipConfig,
        tensors: &HashMap<String, Tensor>,
        source_name: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let candle_config = config.to_candle().map_err(|message| LoadError::Config { path: source_name.into(), message })?;
        let prefix = crate::autoencoder::detect_prefix(tensors, "embeddings.token_embedding.weight");
        let tensors = weights::strip_prefix(tensors, &prefix);
        let model = weights::build_checked(tensors, source_name, dtype, device, |vb| ClipTextTransformer::new(vb, &candle_config))?;
        Ok(Self { model, context: config.max_position_embeddings })
    }

    /// Token ids (B, context) → hidden states (B, context, hidden).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.model.forward_with_mask(ids, usize::MAX)
    }

    pub fn context(&self) -> usize {
        self.context
    }
}

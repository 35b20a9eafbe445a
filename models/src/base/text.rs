//! Prompts → CLIP token ids → the text encoder's last hidden state (SD 1.5 conditions the
//! UNet on all 77 positions after the final layer norm).
//!
//! Over-long prompts are truncated to the encoder's context (77 tokens including the start and
//! end tokens) with a warning naming the dropped text, as diffusers does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::weights::{self, LoadError};

const END_OF_TEXT: &str = "<|endoftext|>";

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
    /// Builds from `text_model.*` tensors (transformers' names), reporting all problems at once.
    pub fn build(
        config: &ClipConfig,
        tensors: &HashMap<String, Tensor>,
        source_name: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let candle_config = config.to_candle().map_err(|message| LoadError::Config { path: source_name.into(), message })?;
        let prefix = crate::autoencoder::detect_prefix(tensors, "text_model.embeddings.token_embedding.weight");
        let tensors = weights::strip_prefix(tensors, &prefix);
        let model =
            weights::build_checked(tensors, source_name, dtype, device, |vb| ClipTextTransformer::new(vb.pp("text_model"), &candle_config))?;
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

/// A prompt as token ids, padded to the context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Tokens dropped because the prompt was longer than the context (0 when it fit).
    pub truncated: usize,
}

/// The CLIP tokenizer from a `tokenizer.json` (its post-processor adds the start/end tokens).
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    end_id: u32,
    pad_id: u32,
    context: usize,
}

impl PromptTokenizer {
    /// Pads with the tokenizer's own padding token if its file sets one, else `<|endoftext|>`
    /// (SD 1.5's choice).
    pub fn load(path: &Path, context: usize) -> Result<Self, LoadError> {
        let tokenizer =
            Tokenizer::from_file(path).map_err(|e| LoadError::Config { path: path.into(), message: format!("not a tokenizer.json: {e}") })?;
        let end_id = tokenizer
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| LoadError::Config { path: path.into(), message: format!("no `{END_OF_TEXT}` token in the vocabulary") })?;
        let pad_id = tokenizer.get_padding().map(|p| p.pad_id).unwrap_or(end_id);
        Ok(Self { tokenizer, end_id, pad_id, context })
    }

    /// Tokenizes with start/end tokens, truncates to the context (keeping the end token) with a
    /// warning, and pads.
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens, String> {
        let encoding = self.tokenizer.encode(prompt, true).map_err(|e| format!("tokenizing prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        let mut truncated = 0;
        if ids.len() > self.context {
            truncated = ids.len() - self.context;
            let dropped = self.tokenizer.decode(&ids[self.context - 1..ids.len() - 1], true).unwrap_or_default();
            tracing::warn!(
                dropped_tokens = truncated,
                "prompt longer than {} tokens: truncated, dropping {dropped:?}",
                self.context
            );
            ids.truncate(self.context - 1);
            ids.push(self.end_id);
        }
        ids.resize(self.context, self.pad_id);
        Ok(Tokens { ids, truncated })
    }

    /// (B, context) u32 ids for `prompts`.
    pub fn batch(&self, prompts: &[&str], device: &Device) -> Result<Tensor, String> {
        let mut flat = Vec::with_capacity(prompts.len() * self.context);
        for p in prompts {
            flat.extend(self.tokenize(p)?.ids);
        }
        Tensor::from_vec(flat, (prompts.len(), self.context), device).map_err(|e| e.to_string())
    }
}

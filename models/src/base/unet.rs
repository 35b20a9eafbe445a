//! The SD UNet: a diffusers `unet/config.json` mapped onto candle-transformers'
//! `UNet2DConditionModel` (whose key names are diffusers').

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig};
use serde::Deserialize;

use crate::weights::{self, LoadError};

/// A config field that diffusers allows as one value or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    fn for_blocks(&self, n: usize, field: &str) -> Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(format!("{field} has {} entries for {n} blocks", v.len())),
        }
    }
}

fn d4() -> usize {
    4
}
fn d2() -> usize {
    2
}
fn d_cross() -> usize {
    1280
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_one() -> usize {
    1
}
fn d_onef() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_no() -> PerBlock<bool> {
    PerBlock::One(false)
}

/// The fields of a diffusers `UNet2DConditionModel` config.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d4")]
    pub in_channels: usize,
    #[serde(default = "d4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d2")]
    pub layers_per_block: usize,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    /// In diffusers' SD UNets this is the number of heads (a known misnomer).
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default = "d_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_onef")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default = "d_no")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
}

impl UNetConfig {
    /// The candle configuration, or why this UNet is outside what it computes.
    pub fn to_candle(&self) -> Result<UNet2DConditionModelConfig, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        let unsupported = |field: &str, value: String| Err(format!("{field} = {value} is not supported"));
        if let Some(dim) = self.time_cond_proj_dim {
            return unsupported("time_cond_proj_dim", dim.to_string());
        }
        if let Some(t) = &self.class_embed_type {
            return unsupported("class_embed_type", t.clone());
        }
        if let Some(t) = &self.addition_embed_type {
            return unsupported("addition_embed_type", t.clone());
        }
        if self.only_cross_attention.for_blocks(n, "only_cross_attention")?.iter().any(|&b| b) {
            return unsupported("only_cross_attention", "true".into());
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "true".into());
        }
        if self.act_fn != "silu" {
            return unsupported("act_fn", self.act_fn.clone());
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift", self.resnet_time_scale_shift.clone());
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", self.time_embedding_type.clone());
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return unsupported("mid_block_type", format!("{:?}", self.mid_block_type));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "down_block_types ({}) and up_block_types ({}) must each have one entry per block_out_channels entry ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let heads = match &self.num_attention_heads {
            Some(h) => h.for_blocks(n, "num_attention_heads")?,
            None => self.attention_head_dim.for_blocks(n, "attention_head_dim")?,
        };
        let layers = self.transformer_layers_per_block.for_blocks(n, "transformer_layers_per_block")?;
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let cross = match self.down_block_types[i].as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return unsupported("down_block_types entry", other.into()),
            };
            // candle builds the up path as the mirror of the down path.
            let expected_up = if cross { "CrossAttnUpBlock2D" } else { "UpBlock2D" };
            if self.up_block_types[n - 1 - i] != expected_up {
                return Err(format!(
                    "up_block_types[{}] = {} does not mirror down_block_types[{i}] = {}",
                    n - 1 - i,
                    self.up_block_types[n - 1 - i],
                    self.down_block_types[i]
                ));
            }
            if cross && self.block_out_channels[i] % heads[i] != 0 {
                return Err(format!("block_out_channels[{i}] = {} is not divisible by {} heads", self.block_out_channels[i], heads[i]));
            }
            blocks.push(BlockConfig {
                out_channels: self.block_out_channels[i],
                use_cross_attn: cross.then_some(layers[i]),
                attention_head_dim: heads[i],
            });
        }
        Ok(UNet2DConditionModelConfig {
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            blocks,
            layers_per_block: self.layers_per_block,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: self.use_linear_projection,
        })
    }
}

/// Builds the UNet from diffusers-named tensors (an optional prefix such as `unet.` is
/// detected), reporting every missing key and wrong shape together.
pub fn build_unet(
    config: &UNetConfig,
    tensors: &HashMap<String, Tensor>,
    source_name: &str,
    dtype: DType,
    device: &Device,
) -> Result<UNet2DConditionModel, LoadError> {
    let candle_config = config.to_candle().map_err(|message| LoadError::Config { path: source_name.into(), message })?;
    let prefix = crate::autoencoder::detect_prefix(tensors, "conv_in.weight");
    let tensors = weights::strip_prefix(tensors, &prefix);
    weights::build_checked(tensors, source_name, dtype, device, |vb| {
        UNet2DConditionModel::new(vb, config.in_channels, config.out_channels, false, candle_config)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UNetConfig {
        serde_json::from_str(
            r#"{"block_out_channels":[320,640,1280,1280],"cross_attention_dim":768,"attention_head_dim":8,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn sd15_config_maps() {
        let c = sd15().to_candle().unwrap();
        assert_eq!(c.blocks.len(), 4);
        assert_eq!(c.blocks[0].use_cross_attn, Some(1));
        assert_eq!(c.blocks[3].use_cross_attn, None);
        assert_eq!(c.blocks[2].attention_head_dim, 8);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut c = sd15();
        c.time_cond_proj_dim = Some(256);
        assert!(c.to_candle().unwrap_err().contains("time_cond_proj_dim"));
        let mut c = sd15();
        c.up_block_types.swap(0, 1);
        assert!(c.to_candle().unwrap_err().contains("mirror"));
    }
}

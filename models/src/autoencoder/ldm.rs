//! The paper's first-stage (LDM / CompVis) checkpoint layout, mapped onto diffusers names.
//!
//! LDM numbers decoder levels from the highest resolution (`up.0` is the last block run),
//! diffusers in run order (`up_blocks.0` is the first), so the decoder index flips.

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use serde::Deserialize;

use super::AutoencoderConfig;

/// The `ddconfig` of an LDM first-stage model.
#[derive(Debug, Clone, Deserialize)]
pub struct LdmConfig {
    #[serde(default = "yes")]
    pub double_z: bool,
    pub z_channels: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_resolutions: Vec<usize>,
    /// Checkpoints record it; inference has no dropout.
    #[serde(default)]
    pub dropout: f64,
    /// The training resolution; not needed to run the model.
    #[serde(default)]
    pub resolution: Option<usize>,
}

fn yes() -> bool {
    true
}

impl LdmConfig {
    /// The `ddconfig` a state dict (prefix stripped) was made with, read off its shapes: for
    /// files that carry none (a `vae-ft-mse` file, a single-file SD checkpoint's
    /// `first_stage_model`, the paper's Lightning checkpoint).
    pub fn from_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Self, String> {
        let shape = |key: &str| shapes.get(key).ok_or_else(|| format!("no `{key}`: not an LDM autoencoder"));
        let conv_in = shape("encoder.conv_in.weight")?;
        let (ch, in_channels) = (conv_in[0], conv_in[1]);
        let levels = (0..).take_while(|i| shapes.contains_key(&format!("encoder.down.{i}.block.0.conv1.weight"))).count();
        let num_res_blocks = (0..).take_while(|j| shapes.contains_key(&format!("encoder.down.0.block.{j}.conv1.weight"))).count();
        if levels == 0 || ch == 0 {
            return Err("no `encoder.down.0.block.0`: not an LDM autoencoder".into());
        }
        let mut ch_mult = Vec::with_capacity(levels);
        for i in 0..levels {
            let out = shape(&format!("encoder.down.{i}.block.0.conv1.weight"))?[0];
            if out % ch != 0 {
                return Err(format!("encoder.down.{i} has {out} channels, not a multiple of conv_in's {ch}"));
            }
            ch_mult.push(out / ch);
        }
        let z_channels = shape("decoder.conv_in.weight")?[1];
        let moments = shape("encoder.conv_out.weight")?[0];
        let attn_resolutions = if shapes.keys().any(|k| k.contains(".attn.")) {
            // Only the presence matters: attention inside the levels is refused downstream.
            vec![0]
        } else {
            Vec::new()
        };
        Ok(Self {
            double_z: moments == 2 * z_channels,
            z_channels,
            in_channels,
            out_ch: shape("decoder.conv_out.weight")?[0],
            ch,
            ch_mult,
            num_res_blocks,
            attn_resolutions,
            dropout: 0.0,
            resolution: None,
        })
    }

    /// The equivalent diffusers configuration. LDM's GroupNorm always has 32 groups.
    pub fn to_autoencoder_config(&self, scaling_factor: f64) -> Result<AutoencoderConfig, String> {
        if !self.double_z {
            return Err("double_z = false (no posterior variance) is not supported".into());
        }
        if !self.attn_resolutions.is_empty() {
            return Err(format!(
                "attn_resolutions {:?}: attention inside the down/up levels is not supported (only the mid block's)",
                self.attn_resolutions
            ));
        }
        let levels = self.ch_mult.len();
        // The kl-f8 family: SD 1.5's block types, quant convs, mid attention, SiLU and 32
        // GroupNorm groups; only the sizes come from the ddconfig.
        Ok(AutoencoderConfig {
            in_channels: self.in_channels,
            out_channels: self.out_ch,
            block_out_channels: self.ch_mult.iter().map(|m| m * self.ch).collect(),
            layers_per_block: self.num_res_blocks,
            latent_channels: self.z_channels,
            scaling_factor,
            down_block_types: vec!["DownEncoderBlock2D".into(); levels],
            up_block_types: vec!["UpDecoderBlock2D".into(); levels],
            ..AutoencoderConfig::sd15()
        })
    }
}

/// Renames one LDM key to its diffusers name; `None` when the key is not part of the model.
fn rename(key: &str, levels: usize) -> Option<String> {
    let (module, param) = key.rsplit_once('.')?;
    let parts: Vec<&str> = module.split('.').collect();
    let renamed: String = match parts.as_slice() {
        ["quant_conv"] | ["post_quant_conv"] => module.to_string(),
        [side @ ("encoder" | "decoder"), rest @ ..] => format!("{side}.{}", rename_inside(side, rest, levels)?),
        _ => return None,
    };
    Some(format!("{renamed}.{param}"))
}

fn rename_inside(side: &str, parts: &[&str], levels: usize) -> Option<String> {
    let resnet = |rest: &[&str]| -> Option<String> {
        match rest {
            ["nin_shortcut"] => Some("conv_shortcut".into()),
            [layer @ ("norm1" | "norm2" | "conv1" | "conv2")] => Some(layer.to_string()),
            _ => None,
        }
    };
    Some(match parts {
        ["conv_in"] => "conv_in".into(),
        ["conv_out"] => "conv_out".into(),
        ["norm_out"] => "conv_norm_out".into(),
        ["mid", "block_1", rest @ ..] => format!("mid_block.resnets.0.{}", resnet(rest)?),
        ["mid", "block_2", rest @ ..] => format!("mid_block.resnets.1.{}", resnet(rest)?),
        ["mid", "attn_1", layer] => {
            let name = match *layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("mid_block.attentions.0.{name}")
        }
        ["down", level, "block", j, rest @ ..] if side == "encoder" => {
            format!("down_blocks.{level}.resnets.{j}.{}", resnet(rest)?)
        }
        ["down", level, "downsample", "conv"] if side == "encoder" => format!("down_blocks.{level}.downsamplers.0.conv"),
        ["up", level, rest @ ..] if side == "decoder" => {
            let level: usize = level.parse().ok()?;
            let block = levels.checked_sub(level + 1)?;
            match rest {
                ["block", j, rest @ ..] => format!("up_blocks.{block}.resnets.{j}.{}", resnet(rest)?),
                ["upsample", "conv"] => format!("up_blocks.{block}.upsamplers.0.conv"),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// Renames an LDM state dict (prefix already stripped) to diffusers names; the attention's
/// 1×1 conv weights become linear weights. Keys that belong to no part of the model (the
/// loss's discriminator, for instance) are left out; an unmappable model key is an error.
pub(super) fn to_diffusers_names(tensors: &HashMap<String, Tensor>, levels: usize) -> Result<HashMap<String, Tensor>, Vec<String>> {
    let mut out = HashMap::new();
    let mut problems = Vec::new();
    for (key, tensor) in tensors {
        let is_model_key = ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."].iter().any(|p| key.starts_with(p));
        if !is_model_key {
            continue;
        }
        let Some(name) = rename(key, levels) else {
            problems.push(format!("unknown LDM key `{key}`"));
            continue;
        };
        let tensor = if name.contains(".attentions.0.to_") && name.ends_with(".weight") && tensor.rank() == 4 {
            match tensor.flatten_from(1) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("`{key}`: {e}"));
                    continue;
                }
            }
        } else {
            tensor.clone()
        };
        out.insert(name, tensor);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        problems.sort();
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_every_kind_of_key() {
        let cases = [
            ("encoder.down.0.block.1.nin_shortcut.weight", "encoder.down_blocks.0.resnets.1.conv_shortcut.weight"),
            ("encoder.down.2.downsample.conv.bias", "encoder.down_blocks.2.downsamplers.0.conv.bias"),
            ("decoder.up.0.block.2.norm1.weight", "decoder.up_blocks.2.resnets.2.norm1.weight"),
            ("decoder.up.2.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
            ("decoder.mid.attn_1.proj_out.bias", "decoder.mid_block.attentions.0.to_out.0.bias"),
            ("encoder.mid.block_2.conv1.weight", "encoder.mid_block.resnets.1.conv1.weight"),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(rename(ldm, 3).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(rename("encoder.up.0.block.0.conv1.weight", 3), None);
        assert_eq!(rename("decoder.up.3.block.0.conv1.weight", 3), None);
    }

    #[test]
    fn ddconfig_is_read_off_the_shapes() {
        let shapes: BTreeMap<String, Vec<usize>> = [
            ("encoder.conv_in.weight", vec![128, 3, 3, 3]),
            ("encoder.down.0.block.0.conv1.weight", vec![128, 128, 3, 3]),
            ("encoder.down.0.block.1.conv1.weight", vec![128, 128, 3, 3]),
            ("encoder.down.1.block.0.conv1.weight", vec![256, 128, 3, 3]),
            ("encoder.down.2.block.0.conv1.weight", vec![512, 256, 3, 3]),
            ("encoder.down.3.block.0.conv1.weight", vec![512, 512, 3, 3]),
            ("encoder.conv_out.weight", vec![8, 512, 3, 3]),
            ("decoder.conv_in.weight", vec![512, 4, 3, 3]),
            ("decoder.conv_out.weight", vec![3, 128, 3, 3]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let c = LdmConfig::from_shapes(&shapes).unwrap();
        assert_eq!((c.ch, c.ch_mult.clone(), c.num_res_blocks, c.z_channels, c.double_z), (128, vec![1, 2, 4, 4], 2, 4, true));
        let sd = c.to_autoencoder_config(0.18215).unwrap();
        assert_eq!(sd.block_out_channels, super::AutoencoderConfig::sd15().block_out_channels);
        let mut with_attn = shapes.clone();
        with_attn.insert("encoder.down.3.attn.0.q.weight".into(), vec![512, 512, 1, 1]);
        assert!(LdmConfig::from_shapes(&with_attn).unwrap().to_autoencoder_config(0.18215).unwrap_err().contains("attn_resolutions"));
        assert!(LdmConfig::from_shapes(&BTreeMap::new()).unwrap_err().contains("encoder.conv_in.weight"));
    }
}

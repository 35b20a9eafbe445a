//! The kl-f8 autoencoder of Stable Diffusion and of the paper's first stage: diffusers and LDM
//! checkpoint layouts, encode to the posterior mean, decode, and tiled decoding for images too
//! big to decode in one pass.
//!
//! Latents come in two flavours: *unscaled* (what the network produces) and *scaled*
//! (`(z − shift) · scaling_factor`, what diffusion models are trained on). [`Autoencoder::encode`]
//! and [`Autoencoder::decode`] speak scaled latents; the `_unscaled` methods speak the network's.

mod blocks;
mod ldm;
mod tiled;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::progress::{self, RunError};
use crate::weights::{self, LoadError};
use blocks::NormStats;

pub use ldm::LdmConfig;
pub use tiled::TileConfig;

fn default_channels() -> usize {
    3
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_act_fn() -> String {
    "silu".into()
}

/// The architecture, as in a diffusers `vae/config.json` (unknown fields are ignored, as
/// diffusers does; the ones that would change the math are checked by [`Self::validate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Latents are `(z − shift_factor) · scaling_factor` (0.18215 for SD 1.5).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
}

impl AutoencoderConfig {
    /// The SD 1.5 VAE (`vae/config.json` of stable-diffusion-v1-5).
    pub fn sd15() -> Self {
        let levels = 4;
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            down_block_types: vec!["DownEncoderBlock2D".into(); levels],
            up_block_types: vec!["UpDecoderBlock2D".into(); levels],
            act_fn: "silu".into(),
        }
    }

    /// Pixels per latent pixel along each side (8 for SD's kl-f8).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Rejects configurations this implementation would silently compute wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        if self.layers_per_block == 0 {
            return Err("layers_per_block must be at least 1".into());
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0) {
            return Err(format!("block_out_channels entry {c} is not divisible by norm_num_groups {}", self.norm_num_groups));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported (only `silu`)", self.act_fn));
        }
        let levels = self.block_out_channels.len();
        for (field, types, expected) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if !types.is_empty() && types.len() != levels {
                return Err(format!("{field} has {} entries but block_out_channels has {levels}", types.len()));
            }
            if let Some(other) = types.iter().find(|t| *t != expected) {
                return Err(format!("{field} entry `{other}` is not supported (only `{expected}`)"));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!("scaling_factor {} must be positive", self.scaling_factor));
        }
        Ok(())
    }
}

/// The kl-f8 autoencoder. Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct Autoencoder {
    config: AutoencoderConfig,
    encoder: blocks::Encoder,
    decoder: blocks::Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    tiling: TileConfig,
}

impl Autoencoder {
    /// Builds the model from a `VarBuilder` with diffusers key names (`encoder.down_blocks…`).
    pub fn new(config: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let moments = 2 * config.latent_channels;
        let quant_conv =
            if config.use_quant_conv { Some(conv2d(moments, moments, 1, Default::default(), vb.pp("quant_conv"))?) } else { None };
        let post_quant_conv = if config.use_post_quant_conv {
            let c = config.latent_channels;
            Some(conv2d(c, c, 1, Default::default(), vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: blocks::Encoder::new(config, vb.pp("encoder"))?,
            decoder: blocks::Decoder::new(config, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
            tiling: TileConfig::default(),
        })
    }

    /// Fresh, untrained weights (convolutions Kaiming-initialised, norms identity, always drawn
    /// from the same seed) as plain tensors, for inference benchmarks and tests. (Training
    /// builds with [`Self::new`] on [`crate::train::seeded_var_builder`]: variables make every
    /// forward keep its graph for the backward pass.)
    pub fn random(config: &AutoencoderConfig, dtype: DType, device: &Device) -> Result<Self> {
        let weights = crate::init::seeded_tensors(0, dtype, device, |vb| Self::new(config, vb))?;
        Self::new(config, VarBuilder::from_tensors(weights, dtype, device))
    }

    /// Builds from diffusers-named tensors (an optional leading prefix such as `vae.` is
    /// detected), reporting every missing key and wrong shape at once.
    pub fn from_diffusers_tensors(
        config: &AutoencoderConfig,
        tensors: &HashMap<String, Tensor>,
        source_name: &str,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        config.validate().map_err(|message| LoadError::Config { path: source_name.into(), message })?;
        let prefix = detect_prefix(tensors, "encoder.conv_in.weight");
        let tensors = weights::strip_prefix(tensors, &prefix);
        weights::build_checked(tensors, source_name, dtype, device, |vb| Self::new(config, vb))
    }

    /// Loads a diffusers `vae/` directory: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or a sharded or `.bin` copy; no variant).
    pub fn load_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        Self::load_diffusers_variant(dir, None, dtype, device)
    }

    /// [`Self::load_diffusers_dir`] reading weights `variant` (`fp16` →
    /// `diffusion_pytorch_model.fp16.safetensors`), exactly that one as diffusers does.
    pub fn load_diffusers_variant(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let config_path = dir.join("config.json");
        let weights_path = weights::find_weights(dir, weights::WeightNames::DIFFUSERS, variant);
        let mut missing = Vec::new();
        if !config_path.is_file() {
            missing.push("config.json".to_string());
        }
        if let Err(what) = &weights_path {
            missing.push(what.clone());
        }
        let Some(weights_path) = weights_path.ok().filter(|_| missing.is_empty()) else {
            return Err(LoadError::MissingFiles { dir: dir.into(), files: missing });
        };
        let config: AutoencoderConfig = weights::read_json(&config_path)?;
        let tensors = weights::read_weights(&weights_path)?;
        Self::from_diffusers_tensors(&config, &tensors, &weights_path.display().to_string(), dtype, device)
    }

    /// Loads an LDM-layout autoencoder file: safetensors or a PyTorch zip pickle (`.ckpt`,
    /// `state_dict` inside a Lightning checkpoint). Its keys may carry a prefix: `ae.`,
    /// `first_stage_model.` (a single-file SD checkpoint: the same file as the base), or
    /// `first_stage.` (the paper's Lightning checkpoint); keys outside it belong to other
    /// networks and are counted, not read. The `ddconfig` comes from the safetensors metadata
    /// when it is there (with `scale_factor`), else from the tensors' shapes; the scaling
    /// factor is then SD's 0.18215, which the paper's trainer uses too.
    pub fn load_ldm_file(path: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let file = crate::tensor_file::TensorFile::open(path)?;
        let metadata = file.metadata();
        let config_error = |message: String| LoadError::Config { path: path.into(), message };
        let prefix = detect_prefix_in(file.shapes().keys().map(String::as_str), "encoder.conv_in.weight");
        let shapes: std::collections::BTreeMap<String, Vec<usize>> = file
            .shapes()
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix.as_str()).map(|k| (k.to_string(), v.clone())))
            .collect();
        let ddconfig: LdmConfig = match metadata.get("ddconfig") {
            Some(json) => serde_json::from_str(json).map_err(|e| config_error(format!("ddconfig: {e}")))?,
            None => LdmConfig::from_shapes(&shapes).map_err(|e| config_error(format!("no `ddconfig` metadata, and {e}")))?,
        };
        let scale_factor = match metadata.get("scale_factor") {
            Some(s) => s.parse::<f64>().map_err(|e| config_error(format!("scale_factor `{s}`: {e}")))?,
            None => default_scaling_factor(),
        };
        let other = file.shapes().len() - shapes.len();
        if other > 0 {
            tracing::info!(path = %path.display(), prefix = %prefix, other_keys = other, "autoencoder read from its prefix; the file's other keys belong to other networks");
        }
        let tensors = file.load_prefixed(&prefix)?;
        Self::from_ldm_tensors(&ddconfig, scale_factor, &tensors, &path.display().to_string(), dtype, device)
    }

    /// Builds from LDM-named tensors (`encoder.down.0.block.0…`, `mid.attn_1.q` as 1×1 convs).
    pub fn from_ldm_tensors(
        ddconfig: &LdmConfig,
        scale_factor: f64,
        tensors: &HashMap<String, Tensor>,
        source_name: &str,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let config = ddconfig
            .to_autoencoder_config(scale_factor)
            .map_err(|message| LoadError::Config { path: source_name.into(), message: format!("ddconfig: {message}") })?;
        let prefix = detect_prefix(tensors, "encoder.conv_in.weight");
        let renamed = ldm::to_diffusers_names(&weights::strip_prefix(tensors, &prefix), config.block_out_channels.len())
            .map_err(|problems| LoadError::Weights { source_name: source_name.into(), problems })?;
        // A well-formed name the network does not have (a fifth level, a third resnet) is as
        // wrong as a missing one.
        let expected = weights::expected_shapes(|vb| Self::new(&config, vb))
            .map_err(|source| LoadError::Candle { context: source_name.into(), source })?;
        let mut unexpected: Vec<String> =
            renamed.keys().filter(|k| !expected.contains_key(*k)).map(|k| format!("unexpected key `{k}` (as diffusers names it)")).collect();
        if !unexpected.is_empty() {
            unexpected.sort();
            return Err(LoadError::Weights { source_name: source_name.into(), problems: unexpected });
        }
        weights::build_checked(renamed, source_name, dtype, device, |vb| Self::new(&config, vb))
    }

    pub fn config(&self) -> &AutoencoderConfig {
        &self.config
    }

    /// The tiling used by [`Self::decode`] for big latents.
    pub fn tiling(&self) -> &TileConfig {
        &self.tiling
    }

    pub fn set_tiling(&mut self, tiling: TileConfig) -> std::result::Result<(), String> {
        tiling.validate()?;
        self.tiling = tiling;
        Ok(())
    }

    /// The posterior's (mean, log-variance), unscaled: what training needs for the KL term.
    pub fn encode_posterior(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        let c = self.config.latent_channels;
        Ok((moments.narrow(1, 0, c)?, moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?))
    }

    /// Image in [−1, 1] → unscaled posterior mean.
    pub fn encode_unscaled(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self.encode_posterior(image)?.0)
    }

    /// Unscaled latent → image, in one pass (attention over every position: mind the size).
    pub fn decode_unscaled(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with(z, &mut NormStats::Own)
    }

    fn decode_with(&self, z: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z, stats)
    }

    /// Image in [−1, 1] → scaled latent `(mean − shift) · scaling_factor`.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        self.scale(&self.encode_unscaled(image)?)
    }

    /// Scaled latent → image in [−1, 1] (not clamped). Tiled, with [`Self::tiling`], when the
    /// latent is larger than its `auto_above` threshold; one differentiable pass otherwise.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        if self.tiling.should_tile(h, w) {
            return self.decode_tiled(z, &self.tiling, &mut progress::ignore).map_err(|e| match e {
                RunError::Candle(e) => e,
                cancelled => candle_core::Error::msg(cancelled.to_string()),
            });
        }
        self.decode_unscaled(&self.unscale(z)?)
    }

    /// Scaled latent → image, always tiled; the image is assembled on the CPU tile by tile and
    /// returned on `z`'s device. `progress` is called after every tile of both passes and may
    /// stop the decode.
    ///
    /// The decoder's latent-resolution head (conv_in and the mid block with its attention)
    /// runs once on the whole latent — exact, and small: latent-sized, with attention in
    /// query chunks. Only the up blocks, where the pixels and the memory are, run in tiles, in
    /// two passes: the first decodes up to 3×3 tiles spread over the image with their own
    /// GroupNorm statistics and keeps only those; the second decodes every tile with their
    /// average, so all tiles are normalised alike (as the whole image would be) and
    /// neighbours agree.
    pub fn decode_tiled(&self, z: &Tensor, tiles: &TileConfig, progress: progress::Progress) -> std::result::Result<Tensor, RunError> {
        tiles.validate().map_err(candle_core::Error::msg)?;
        let z = self.unscale(z)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        let head = self.decoder.forward_head(&z, &mut NormStats::Own)?;
        let (_, _, height, width) = head.dims4()?;
        let rects = tiled::tile_rects(height, width, tiles);
        let sampled = tiled::stat_sample(height, width, tiles);
        let total = sampled.len() + rects.len();
        let mut per_tile = Vec::with_capacity(sampled.len());
        for (done, &(y0, x0, th, tw)) in sampled.iter().enumerate() {
            let tile = head.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
            let mut recording = NormStats::Record(Vec::new());
            self.decoder.forward_tail(&tile, &mut recording)?;
            let NormStats::Record(stats) = recording else { unreachable!("a recording stays a recording") };
            per_tile.push(stats);
            progress::report(progress, done + 1, total)?;
        }
        let shared = blocks::average_stats(&per_tile)?;
        let image = tiled::decode(&head, tiles, self.config.downscale(), progress, (sampled.len(), total), |tile| {
            self.decoder.forward_tail(tile, &mut NormStats::Replay { stats: shared.clone(), next: 0 })
        })?;
        Ok(image.to_device(z.device())?)
    }

    fn scale(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        z.affine(self.config.scaling_factor, -shift * self.config.scaling_factor)
    }

    fn unscale(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        z.affine(1.0 / self.config.scaling_factor, shift)
    }
}

/// The prefix (possibly empty) before `anchor` in the keys, e.g. `vae.` or `first_stage_model.`.
pub(crate) fn detect_prefix(tensors: &HashMap<String, Tensor>, anchor: &str) -> String {
    detect_prefix_in(tensors.keys().map(String::as_str), anchor)
}

/// [`detect_prefix`] over key names.
pub(crate) fn detect_prefix_in<'a>(names: impl Iterator<Item = &'a str>, anchor: &str) -> String {
    let mut prefixes: Vec<&str> = names.filter_map(|k| k.strip_suffix(anchor)).filter(|p| p.is_empty() || p.ends_with('.')).collect();
    prefixes.sort_by_key(|p| p.len());
    prefixes.first().map(|p| p.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny_config() -> AutoencoderConfig {
        AutoencoderConfig {
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            down_block_types: vec![],
            up_block_types: vec![],
            ..AutoencoderConfig::sd15()
        }
    }

    #[test]
    fn shapes_and_scaling_roundtrip() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let ae = Autoencoder::new(&tiny_config(), vb).unwrap();
        let image = Tensor::randn(0f32, 1., (2, 3, 16, 24), &Device::Cpu).unwrap();
        let z = ae.encode(&image).unwrap();
        assert_eq!(z.dims(), &[2, 4, 8, 12]);
        let unscaled = ae.encode_unscaled(&image).unwrap();
        let diff = (z - (unscaled * 0.18215).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        assert_eq!(ae.decode(&ae.encode(&image).unwrap()).unwrap().dims(), &[2, 3, 16, 24]);
    }

    #[test]
    fn gradients_reach_every_weight() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let ae = Autoencoder::new(&tiny_config(), vb).unwrap();
        let image = Tensor::randn(0f32, 1., (1, 3, 8, 8), &Device::Cpu).unwrap();
        let loss = ae.decode_unscaled(&ae.encode_unscaled(&image).unwrap()).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for var in map.all_vars() {
            assert!(grads.get(&var).is_some(), "no gradient for a variable of shape {:?}", var.dims());
        }
    }

    #[test]
    fn rejects_unsupported_config_naming_the_field() {
        let mut cfg = tiny_config();
        cfg.up_block_types = vec!["AttnUpDecoderBlock2D".into(), "UpDecoderBlock2D".into()];
        assert!(cfg.validate().unwrap_err().contains("up_block_types"));
        let mut cfg = tiny_config();
        cfg.block_out_channels = vec![8, 10];
        assert!(cfg.validate().unwrap_err().contains("norm_num_groups"));
    }
}

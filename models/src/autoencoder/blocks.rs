//! The kl-f8 encoder and decoder, with diffusers' `AutoencoderKL` key names.
//!
//! Every op here has a backward pass (softmax via `ops::softmax`, GroupNorm from plain tensor
//! ops, nearest upsampling), so the trainer can train this very module.
//!
//! Forward passes thread a [`NormStats`] through every GroupNorm so tiled decoding can
//! normalise all tiles with the same image-wide statistics.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, linear, ops, Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::cfm::Conv3x3;

use super::AutoencoderConfig;

/// GroupNorm epsilon of the whole autoencoder (diffusers and LDM alike).
const NORM_EPS: f64 = 1e-6;

/// Largest attention score block computed at once (f32 bytes); bigger latents go in query chunks.
const ATTENTION_SCORE_BYTES: usize = 256 << 20;

/// Where GroupNorms take their per-(sample, group) mean and variance from.
pub(super) enum NormStats {
    /// From their own input: the ordinary forward pass.
    Own,
    /// From their own input, remembering them in call order.
    Record(Vec<(Tensor, Tensor)>),
    /// From given statistics, in call order: tiled decoding hands every tile the same,
    /// image-wide ones (a tile differs from the whole in mean and spread).
    Replay { stats: Vec<(Tensor, Tensor)>, next: usize },
}

/// Pools per-tile GroupNorm statistics (equal-size tiles, equal weights) into one set:
/// the mean of the means, and E[x²] − mean² for the variance.
pub(super) fn average_stats(per_tile: &[Vec<(Tensor, Tensor)>]) -> Result<Vec<(Tensor, Tensor)>> {
    let Some(first) = per_tile.first() else { candle_core::bail!("no tiles to pool statistics from") };
    if per_tile.iter().any(|s| s.len() != first.len()) {
        candle_core::bail!("tiles recorded different numbers of GroupNorm calls");
    }
    let n = per_tile.len() as f64;
    (0..first.len())
        .map(|layer| {
            let means = Tensor::stack(&per_tile.iter().map(|s| s[layer].0.clone()).collect::<Vec<_>>(), 0)?;
            let second = Tensor::stack(&per_tile.iter().map(|s| &s[layer].1 + s[layer].0.sqr()?).collect::<Result<Vec<_>>>()?, 0)?;
            let mean = (means.sum(0)? / n)?;
            let var = ((second.sum(0)? / n)? - mean.sqr()?)?.relu()?;
            Ok((mean, var))
        })
        .collect()
}

/// GroupNorm (statistics in f32) with an affine per-channel output.
#[derive(Debug, Clone)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

fn group_norm(groups: usize, channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    if channels % groups != 0 {
        candle_core::bail!("GroupNorm: {channels} channels are not divisible into {groups} groups");
    }
    // Fresh (untrained) weights start as the identity affine, as nn.GroupNorm's do.
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    Ok(GroupNorm { weight, bias, groups })
}

impl GroupNorm {
    fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let dtype = xs.dtype();
        let grouped = xs.reshape((b, self.groups, (c / self.groups) * h * w))?.to_dtype(DType::F32)?;
        let own = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let mean = x.mean_keepdim(2)?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
            Ok((mean, var))
        };
        let (mean, var) = match stats {
            NormStats::Own => own(&grouped)?,
            NormStats::Record(list) => {
                let (mean, var) = own(&grouped)?;
                // Detached: with trainable weights the statistics would otherwise keep the
                // whole graph of the pass that recorded them alive.
                list.push((mean.detach(), var.detach()));
                (mean, var)
            }
            NormStats::Replay { stats, next } => {
                let s = stats.get(*next).cloned().ok_or_else(|| candle_core::Error::msg("GroupNorm replay ran out of recorded statistics"))?;
                *next += 1;
                s
            }
        };
        let normed = grouped.broadcast_sub(&mean)?.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?;
        normed
            .reshape((b, c, h, w))?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}

/// The UNet's fast 3×3 convolution (shifted GEMMs forward and backward on the CPU in f32,
/// candle's conv2d elsewhere); same weights and initialisation as `candle_nn::conv2d`.
fn conv3x3(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv3x3> {
    Conv3x3::new(c_in, c_out, vb)
}

/// GroupNorm → SiLU → conv, twice, with a 1×1 shortcut when the width changes.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv3x3,
    norm2: GroupNorm,
    conv2: Conv3x3,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(c_in: usize, c_out: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if c_in != c_out {
            Some(conv2d(c_in, c_out, 1, Default::default(), vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, c_in, vb.pp("norm1"))?,
            conv1: conv3x3(c_in, c_out, vb.pp("conv1"))?,
            norm2: group_norm(groups, c_out, vb.pp("norm2"))?,
            conv2: conv3x3(c_out, c_out, vb.pp("conv2"))?,
            shortcut,
        })
    }
}

impl ResnetBlock {
    fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let h = self.conv1.forward(&ops::silu(&self.norm1.forward(xs, stats)?)?)?;
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h, stats)?)?)?;
        match &self.shortcut {
            Some(conv) => conv.forward(xs)? + h,
            None => xs + h,
        }
    }
}

/// Single-head self-attention over all positions (the mid block's), scale 1/√C.
#[derive(Debug, Clone)]
struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl Attention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }
}

impl Attention {
    fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let hs = self.group_norm.forward(xs, stats)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        let kt = (k.t()? / (c as f64).sqrt())?;
        // Queries in chunks so the score matrix stays within ATTENTION_SCORE_BYTES.
        let positions = h * w;
        let rows = (ATTENTION_SCORE_BYTES / (b * positions * 4).max(1)).clamp(1, positions);
        let mut chunks = Vec::with_capacity(positions.div_ceil(rows));
        for start in (0..positions).step_by(rows) {
            let q = q.narrow(1, start, rows.min(positions - start))?;
            chunks.push(ops::softmax(&q.matmul(&kt)?, D::Minus1)?.matmul(&v)?);
        }
        let attended = if chunks.len() == 1 { chunks.remove(0) } else { Tensor::cat(&chunks, 1)? };
        let out = self.to_out.forward(&attended)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// resnet → attention (optional) → resnet at the lowest resolution.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<Attention>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, with_attention: bool, vb: VarBuilder) -> Result<Self> {
        let attention = if with_attention {
            Some(Attention::new(channels, groups, vb.pp("attentions.0"))?)
        } else {
            None
        };
        Ok(Self {
            resnet_in: ResnetBlock::new(channels, channels, groups, vb.pp("resnets.0"))?,
            attention,
            resnet_out: ResnetBlock::new(channels, channels, groups, vb.pp("resnets.1"))?,
        })
    }
}

impl MidBlock {
    fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let mut xs = self.resnet_in.forward(xs, stats)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs, stats)?;
        }
        self.resnet_out.forward(&xs, stats)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// Stride-2 conv after an asymmetric (right/bottom) zero pad, as the reference does.
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, stats)?;
        }
        match &self.downsample {
            Some(conv) => conv.forward(&xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// Nearest ×2 then a 3×3 conv.
    upsample: Option<Conv3x3>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, stats)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(xs),
        }
    }
}

/// Image → `2 · latent_channels` moments (before `quant_conv`).
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    conv_in: Conv3x3,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl Encoder {
    pub(super) fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &c_out) in channels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let c_in = if i == 0 { channels[0] } else { channels[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock::new(if j == 0 { c_in } else { c_out }, c_out, groups, vb.pp(format!("resnets.{j}"))))
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < channels.len() {
                Some(conv2d(c_out, c_out, 3, Conv2dConfig { stride: 2, ..Default::default() }, vb.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, downsample });
        }
        let top = *channels.last().expect("validated non-empty");
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, channels[0], vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(top, groups, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(groups, top, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(top, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let stats = &mut NormStats::Own;
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs, stats)?;
        }
        let xs = self.mid_block.forward(&xs, stats)?;
        self.conv_out.forward(&ops::silu(&self.conv_norm_out.forward(&xs, stats)?)?)
    }
}

/// Latent (after `post_quant_conv`) → image.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: Conv3x3,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl Decoder {
    pub(super) fn new(cfg: &AutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let top = reversed[0];
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut c_prev = top;
        for (i, &c_out) in reversed.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock::new(if j == 0 { c_prev } else { c_out }, c_out, groups, vb.pp(format!("resnets.{j}"))))
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < reversed.len() { Some(conv3x3(c_out, c_out, vb.pp("upsamplers.0.conv"))?) } else { None };
            up_blocks.push(UpBlock { resnets, upsample });
            c_prev = c_out;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv3x3(cfg.latent_channels, top, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(top, groups, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: group_norm(groups, bottom, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(bottom, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Decoder {
    pub(super) fn forward(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        self.forward_tail(&self.forward_head(xs, stats)?, stats)
    }

    /// conv_in and the mid block: everything at latent resolution (with the only attention).
    pub(super) fn forward_head(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        self.mid_block.forward(&self.conv_in.forward(xs)?, stats)
    }

    /// The up blocks and output layers: the bulk of the work, all convolutional.
    pub(super) fn forward_tail(&self, xs: &Tensor, stats: &mut NormStats) -> Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.up_blocks {
            xs = block.forward(&xs, stats)?;
        }
        self.conv_out.forward(&ops::silu(&self.conv_norm_out.forward(&xs, stats)?)?)
    }
}

//! The kl-f8 encoder and decoder, with diffusers' `AutoencoderKL` key names.
//!
//! Every op here has a backward pass (softmax via `ops::softmax`, `GroupNorm`, nearest
//! upsampling), so the trainer can train this very module.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{conv2d, group_norm, linear, ops, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

use super::AutoencoderConfig;

/// GroupNorm epsilon of the whole autoencoder (diffusers and LDM alike).
const NORM_EPS: f64 = 1e-6;

fn conv3x3(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(c_in, c_out, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)
}

/// GroupNorm → SiLU → conv, twice, with a 1×1 shortcut when the width changes.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
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
            norm1: group_norm(groups, c_in, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv3x3(c_in, c_out, vb.pp("conv1"))?,
            norm2: group_norm(groups, c_out, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv3x3(c_out, c_out, vb.pp("conv2"))?,
            shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&ops::silu(&self.norm1.forward(xs)?)?)?;
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h)?)?)?;
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
            group_norm: group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let hs = self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        let scores = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        let attended = ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
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

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_in.forward(xs)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.resnet_out.forward(&xs)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// Stride-2 conv after an asymmetric (right/bottom) zero pad, as the reference does.
    downsample: Option<Conv2d>,
}

impl Module for DownBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs)?;
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
    upsample: Option<Conv2d>,
}

impl Module for UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs)?;
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
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
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
            conv_norm_out: group_norm(groups, top, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(top, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        self.conv_out.forward(&ops::silu(&self.conv_norm_out.forward(&xs)?)?)
    }
}

/// Latent (after `post_quant_conv`) → image.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
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
            conv_norm_out: group_norm(groups, bottom, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(bottom, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(xs)?)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        self.conv_out.forward(&ops::silu(&self.conv_norm_out.forward(&xs)?)?)
    }
}

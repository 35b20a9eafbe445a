//! The paper's `EfficientUNet`: a timestep-conditioned UNet whose input is cat[x_t, context].

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, GroupNorm, VarBuilder};

use super::config::UNetConfig;
use super::layers::{conv3x3, group_norm, Downsample, ResBlock, SpatialSelfAttention, TimeEmbed, Upsample};
use super::plan::{InputBlock, Plan};

#[derive(Debug, Clone)]
enum EncoderBlock {
    Res { res: ResBlock, attention: Option<SpatialSelfAttention> },
    Down(Downsample),
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    res: ResBlock,
    attention: Option<SpatialSelfAttention>,
    upsample: Option<Upsample>,
}

/// The velocity network v(x_t, t, context).
#[derive(Debug, Clone)]
pub struct EfficientUNet {
    config: UNetConfig,
    time_embed: TimeEmbed,
    stem: Conv2d,
    encoder: Vec<EncoderBlock>,
    middle: (ResBlock, SpatialSelfAttention, ResBlock),
    decoder: Vec<DecoderBlock>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    dtype: DType,
    device: Device,
}

impl EfficientUNet {
    /// Builds the network from `vb` (weights under the reference's names, without any prefix).
    /// Use a `VarMap`-backed builder to train, [`super::load_unet`] to load a checkpoint.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let plan = Plan::new(config);
        let emb_dim = config.time_embed_dim();
        let scale_shift = config.use_scale_shift_norm;
        let attention = |ch: usize, linear: bool, vb: VarBuilder| {
            SpatialSelfAttention::new(ch, config.num_heads, config.dim_head, linear, vb)
        };

        let vb_in = vb.pp("input_blocks");
        let stem = conv3x3(config.in_channels, config.model_channels, 1, vb_in.pp("0").pp("0"))?;
        let mut encoder = Vec::with_capacity(plan.input.len());
        for (i, block) in plan.input.iter().enumerate() {
            let vb = vb_in.pp(i + 1);
            encoder.push(match *block {
                InputBlock::Res { in_ch, out_ch, attention: with_attention, .. } => EncoderBlock::Res {
                    res: ResBlock::new(in_ch, out_ch, emb_dim, scale_shift, vb.pp("0"))?,
                    attention: if with_attention {
                        Some(attention(out_ch, config.use_linear_attn, vb.pp("1"))?)
                    } else {
                        None
                    },
                },
                InputBlock::Down { ch, .. } => EncoderBlock::Down(Downsample::new(ch, config.conv_resample, vb.pp("0"))?),
            });
        }

        let vb_mid = vb.pp("middle_block");
        let ch = plan.middle_ch;
        let middle = (
            ResBlock::new(ch, ch, emb_dim, scale_shift, vb_mid.pp("0"))?,
            attention(ch, false, vb_mid.pp("1"))?,
            ResBlock::new(ch, ch, emb_dim, scale_shift, vb_mid.pp("2"))?,
        );

        let vb_out = vb.pp("output_blocks");
        let mut decoder = Vec::with_capacity(plan.output.len());
        for (i, block) in plan.output.iter().enumerate() {
            let vb = vb_out.pp(i);
            let res = ResBlock::new(block.in_ch, block.out_ch, emb_dim, scale_shift, vb.pp("0"))?;
            let attention = if block.attention {
                Some(attention(block.out_ch, config.use_linear_attn, vb.pp("1"))?)
            } else {
                None
            };
            // The upsample's index in the sequential depends on whether attention precedes it.
            let up_index = if block.attention { "2" } else { "1" };
            let upsample = if block.upsample {
                Some(Upsample::new(block.out_ch, config.conv_resample, vb.pp(up_index))?)
            } else {
                None
            };
            decoder.push(DecoderBlock { res, attention, upsample });
        }

        Ok(Self {
            config: config.clone(),
            time_embed: TimeEmbed::new(config.model_channels, vb.pp("time_embed"))?,
            stem,
            encoder,
            middle,
            decoder,
            out_norm: group_norm(config.model_channels, vb.pp("out.0"))?,
            out_conv: conv3x3(config.model_channels, config.out_channels, 1, vb.pp("out.2"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights (inputs are cast to it, the output is in it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// v = net(cat[x_t, context], t). `x_t` is [B, C, H, W]; `t` is [B] (or [1], broadcast)
    /// in [0, 1]; `context` [B, C', H, W] is concatenated after `x_t` on the channel axis, and
    /// C + C' must equal `in_channels` (`None`: a plain UNet on x_t alone). H and W must be
    /// divisible by 2^(levels − 1).
    pub fn forward(&self, x_t: &Tensor, t: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let x = match context {
            Some(context) => {
                if context.dims().len() != 4 || context.dim(0)? != x_t.dim(0)? || context.dims()[2..] != x_t.dims()[2..] {
                    candle_core::bail!(
                        "EfficientUNet: context shape {:?} does not match x_t {:?} in batch and spatial size",
                        context.dims(),
                        x_t.dims()
                    );
                }
                Tensor::cat(&[&x_t.to_dtype(self.dtype)?, &context.to_dtype(self.dtype)?], 1)?
            }
            None => x_t.to_dtype(self.dtype)?,
        };
        let (b, c, h, w) = x.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "EfficientUNet: input has {c} channels (x_t {} + context {}), config in_channels is {}",
                x_t.dim(1)?,
                context.map(|c| c.dim(1)).transpose()?.unwrap_or(0),
                self.config.in_channels
            );
        }
        let multiple = 1usize << self.config.downsamplings();
        if h % multiple != 0 || w % multiple != 0 {
            candle_core::bail!("EfficientUNet: spatial size {h}×{w} must be divisible by {multiple} (2^(levels−1))");
        }
        let t = match t.dims() {
            [n] if *n == b => t.clone(),
            [1] | [] => t.reshape(1)?.broadcast_as(b)?.contiguous()?,
            other => candle_core::bail!("EfficientUNet: t has shape {other:?}, expected [{b}] or [1]"),
        };
        let emb = self.time_embed.forward(&t, self.dtype)?;

        let mut h = self.stem.forward(&x)?;
        let mut skips = Vec::with_capacity(self.encoder.len() + 1);
        skips.push(h.clone());
        for block in &self.encoder {
            h = match block {
                EncoderBlock::Res { res, attention } => {
                    let h = res.forward(&h, &emb)?;
                    match attention {
                        Some(attention) => attention.forward(&h)?,
                        None => h,
                    }
                }
                EncoderBlock::Down(down) => down.forward(&h)?,
            };
            skips.push(h.clone());
        }

        let (res_1, attention, res_2) = &self.middle;
        h = res_2.forward(&attention.forward(&res_1.forward(&h, &emb)?)?, &emb)?;

        for block in &self.decoder {
            let skip = skips.pop().expect("plan pairs every decoder block with a skip");
            h = block.res.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb)?;
            if let Some(attention) = &block.attention {
                h = attention.forward(&h)?;
            }
            if let Some(upsample) = &block.upsample {
                h = upsample.forward(&h)?;
            }
        }
        self.out_conv.forward(&self.out_norm.forward(&h)?.silu()?)
    }
}

//! The paper's `EfficientUNet`: a timestep-conditioned UNet whose input is cat[x_t, context].

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::UNetConfig;
use super::conv::Conv3x3;
use super::norm::GroupNorm;
use super::layers::{conv3x3, group_norm, Downsample, ResBlock, SpatialSelfAttention, TimeEmbed, Upsample};
use super::plan::{InputBlock, Plan};

// A few dozen blocks built once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    stem: Conv3x3,
    encoder: Vec<EncoderBlock>,
    middle: (ResBlock, SpatialSelfAttention, ResBlock),
    decoder: Vec<DecoderBlock>,
    out_norm: GroupNorm,
    out_conv: Conv3x3,
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
        let stem = conv3x3(config.in_channels, config.model_channels, vb_in.pp("0").pp("0"))?;
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
            out_conv: conv3x3(config.model_channels, config.out_channels, vb.pp("out.2"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// A network with fresh weights (candle's initialisers, always drawn from the same seed),
    /// detached from any autograd graph: for benchmarks and tests, not for training (use
    /// [`crate::train::seeded_var_builder`]).
    pub fn random(config: &UNetConfig, device: &Device, dtype: DType) -> Result<Self> {
        let weights = crate::init::seeded_tensors(0, dtype, device, |vb| Self::new(config, vb))?;
        Self::new(config, VarBuilder::from_tensors(weights, dtype, device))
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
        self.out_conv.forward(&self.out_norm.forward_silu(&h, None)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cfm::config::tiny;
    use candle_nn::VarMap;

    fn random_unet(config: &UNetConfig) -> (EfficientUNet, VarMap) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        (EfficientUNet::new(config, vb).unwrap(), varmap)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn batch_items_are_independent_and_non_square_works() {
        for linear in [false, true] {
            let (unet, _) = random_unet(&tiny(linear));
            let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 12), &Device::Cpu).unwrap();
            let ctx = Tensor::randn(0f32, 1.0, (2, 4, 8, 12), &Device::Cpu).unwrap();
            let t = Tensor::new(&[0.25f32, 0.75], &Device::Cpu).unwrap();
            let both = unet.forward(&x, &t, Some(&ctx)).unwrap();
            assert_eq!(both.dims(), &[2, 4, 8, 12]);
            let second = unet.forward(&x.narrow(0, 1, 1).unwrap(), &t.narrow(0, 1, 1).unwrap(), Some(&ctx.narrow(0, 1, 1).unwrap())).unwrap();
            let (a, b) = (values(&both.narrow(0, 1, 1).unwrap()), values(&second));
            let max = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(max < 1e-4, "linear={linear}: batch item differs by {max}");
        }
    }

    #[test]
    fn without_context_it_is_a_plain_unet() {
        let mut config = tiny(false);
        config.in_channels = 4;
        let (unet, _) = random_unet(&config);
        let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        assert_eq!(unet.forward(&x, &t, None).unwrap().dims(), &[1, 4, 8, 8]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let (unet, _) = random_unet(&tiny(false));
        let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let err = unet.forward(&x, &t, None).unwrap_err().to_string();
        assert!(err.contains("in_channels is 8"), "{err}");
        let odd = Tensor::zeros((1, 4, 7, 8), DType::F32, &Device::Cpu).unwrap();
        let err = unet.forward(&odd, &t, Some(&odd)).unwrap_err().to_string();
        assert!(err.contains("divisible by 2"), "{err}");
        let t3 = Tensor::new(&[0.1f32, 0.2, 0.3], &Device::Cpu).unwrap();
        let err = unet.forward(&x, &t3, Some(&x)).unwrap_err().to_string();
        assert!(err.contains("t has shape [3]"), "{err}");
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for linear in [false, true] {
            let (unet, varmap) = random_unet(&tiny(linear));
            let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
            let t = Tensor::new(&[0.3f32, 0.6], &Device::Cpu).unwrap();
            let loss = unet.forward(&x, &t, Some(&x)).unwrap().sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            let vars = varmap.data().lock().unwrap();
            assert_eq!(vars.len(), crate::cfm::parameter_shapes(&tiny(linear)).unwrap().len());
            for (name, var) in vars.iter() {
                let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
                let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm.is_finite() && norm > 0.0, "{name}: gradient norm {norm}");
            }
        }
    }
}

//! The building blocks of the `EfficientUNet`, with the reference's parameter names. Every op
//! here has a backward pass in candle (no `softmax_last_dim`, no `upsample_bilinear2d`), so the
//! same code serves sampling and training.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::NORM_GROUPS;
use super::conv::Conv3x3;
use super::norm::GroupNorm;

/// GroupNorm eps of the UNet (PyTorch's default).
const NORM_EPS: f64 = 1e-5;

pub(crate) fn group_norm(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(NORM_GROUPS, channels, NORM_EPS, vb)
}

pub(crate) fn conv3x3(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Conv3x3> {
    Conv3x3::new(in_ch, out_ch, vb)
}

/// Sinusoidal embedding of `t` (shape [B], used as it is: t ∈ [0, 1], no ×1000), cos half
/// first, then sin, zero-padded to an odd `dim`. Computed in f32 like the reference.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let max_period = 10000f32;
    let freqs: Vec<f32> = (0..half).map(|i| (-max_period.ln() * i as f32 / half as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((t.dim(0)?, 1), DType::F32, t.device())?);
    }
    Tensor::cat(&parts, D::Minus1)
}

/// `time_embed`: Linear(model_channels → 4·mc), SiLU, Linear(4·mc → 4·mc).
#[derive(Debug, Clone)]
pub(crate) struct TimeEmbed {
    linear_1: Linear,
    linear_2: Linear,
    model_channels: usize,
}

impl TimeEmbed {
    pub fn new(model_channels: usize, vb: VarBuilder) -> Result<Self> {
        let dim = 4 * model_channels;
        Ok(Self {
            linear_1: candle_nn::linear(model_channels, dim, vb.pp("0"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("2"))?,
            model_channels,
        })
    }

    /// `t` [B] in [0, 1] → [B, 4·mc] in `dtype`.
    pub fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let emb = timestep_embedding(t, self.model_channels)?.to_dtype(dtype)?;
        self.linear_2.forward(&self.linear_1.forward(&emb)?.silu()?)
    }
}

/// `ResBlock`: GN–SiLU–conv, timestep modulation, GN–SiLU–conv, plus a (1×1 conv) skip.
#[derive(Debug, Clone)]
pub(crate) struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv3x3,
    emb_linear: Linear,
    out_norm: GroupNorm,
    out_conv: Conv3x3,
    skip: Option<Pointwise>,
    use_scale_shift_norm: bool,
}

impl ResBlock {
    pub fn new(in_ch: usize, out_ch: usize, emb_dim: usize, use_scale_shift_norm: bool, vb: VarBuilder) -> Result<Self> {
        let emb_out = if use_scale_shift_norm { 2 * out_ch } else { out_ch };
        let skip = if in_ch == out_ch {
            None
        } else {
            Some(Pointwise::new(in_ch, out_ch, 2, vb.pp("skip_connection"))?)
        };
        Ok(Self {
            in_norm: group_norm(in_ch, vb.pp("in_layers.0"))?,
            in_conv: conv3x3(in_ch, out_ch, vb.pp("in_layers.2"))?,
            emb_linear: candle_nn::linear(emb_dim, emb_out, vb.pp("emb_layers.1"))?,
            out_norm: group_norm(out_ch, vb.pp("out_layers.0"))?,
            out_conv: conv3x3(out_ch, out_ch, vb.pp("out_layers.3"))?,
            skip,
            use_scale_shift_norm,
        })
    }

    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.in_conv.forward(&self.in_norm.forward_silu(x, None)?)?;
        let emb_out = self.emb_linear.forward(&emb.silu()?)?; // [B, C or 2C]
        let h = if self.use_scale_shift_norm {
            let chunks = emb_out.chunk(2, 1)?;
            self.out_norm.forward_silu(&h, Some((&chunks[0], &chunks[1])))?
        } else {
            // [B, C] → [B, C, 1, 1] so it broadcasts over the spatial axes.
            self.out_norm.forward_silu(&h.broadcast_add(&emb_out.unsqueeze(2)?.unsqueeze(3)?)?, None)?
        };
        let h = self.out_conv.forward(&h)?;
        match &self.skip {
            Some(skip) => skip.forward_2d(x)? + h,
            None => x + h,
        }
    }
}

/// A 1×1 convolution (`Conv1d` weight [out, in, 1] or `Conv2d` weight [out, in, 1, 1]) as one
/// matmul over all positions: [out, in] · [B, in, L].
#[derive(Debug, Clone)]
struct Pointwise {
    weight: Tensor,
    bias: Tensor,
}

impl Pointwise {
    /// `spatial_dims` is 1 for Conv1d, 2 for Conv2d (the weight's trailing unit axes).
    fn new(in_ch: usize, out_ch: usize, spatial_dims: usize, vb: VarBuilder) -> Result<Self> {
        let mut shape = vec![out_ch, in_ch];
        shape.extend(std::iter::repeat_n(1, spatial_dims));
        // Same initialisation as candle's convolutions. `squeeze`, not `reshape`: a view, so
        // building the shape-only plan allocates nothing.
        let mut weight = vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        for _ in 0..spatial_dims {
            weight = weight.squeeze(2)?;
        }
        let bound = 1.0 / (in_ch as f64).sqrt();
        let bias = vb.get_with_hints(out_ch, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?.unsqueeze(1)?;
        Ok(Self { weight, bias })
    }

    /// x [B, in, L] → [B, out, L].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.broadcast_matmul(x)?.broadcast_add(&self.bias)
    }

    /// x [B, in, H, W] → [B, out, H, W].
    fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        self.forward(&x.reshape((b, c, h * w))?)?.reshape((b, self.bias.dim(0)?, h, w))
    }
}

/// `SpatialSelfAttention`: GN, qkv projection, (linear or softmax) multi-head attention,
/// output projection, residual.
#[derive(Debug, Clone)]
pub(crate) struct SpatialSelfAttention {
    norm: GroupNorm,
    qkv: Pointwise,
    proj_out: Pointwise,
    heads: usize,
    dim_head: usize,
    linear: bool,
}

impl SpatialSelfAttention {
    pub fn new(dim: usize, heads: usize, dim_head: usize, linear: bool, vb: VarBuilder) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            norm: group_norm(dim, vb.pp("norm"))?,
            qkv: Pointwise::new(dim, 3 * inner, 1, vb.pp("qkv"))?,
            proj_out: Pointwise::new(inner, dim, 1, vb.pp("proj_out"))?,
            heads,
            dim_head,
            linear,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let l = h * w;
        let x = x.reshape((b, c, l))?;
        let qkv = self.qkv.forward(&self.norm.forward(&x)?)?;
        // The reference reshapes (B, 3·heads·dh, L) straight to (B, heads, L, 3·dh): no
        // transpose. This mixes channels and positions, and checkpoints are trained with it.
        let qkv = qkv.reshape((b, self.heads, l, 3 * self.dim_head))?;
        let dh = self.dim_head;
        let q = qkv.narrow(3, 0, dh)?.contiguous()?;
        let k = qkv.narrow(3, dh, dh)?.contiguous()?;
        let v = qkv.narrow(3, 2 * dh, dh)?.contiguous()?;
        let scale = 1.0 / (dh as f64).sqrt();
        let out = if self.linear {
            // Efficient attention (Shen et al.): softmax q over features, k over positions.
            let q = (candle_nn::ops::softmax(&q, D::Minus1)? * scale)?;
            let k = candle_nn::ops::softmax(&k, D::Minus2)?;
            let context = k.t()?.matmul(&v)?; // (B, heads, dh, dh)
            q.matmul(&context)?
        } else {
            let scores = (q.matmul(&k.t()?)? * scale)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?
        };
        let out = out.reshape((b, self.heads * dh, l))?;
        (x + self.proj_out.forward(&out)?)?.reshape((b, c, h, w))
    }
}

/// `Downsample`: stride-2 3×3 conv (`op`) or 2×2 average pooling.
#[derive(Debug, Clone)]
pub(crate) enum Downsample {
    Conv(Conv3x3),
    AvgPool,
}

impl Downsample {
    pub fn new(ch: usize, use_conv: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if use_conv { Self::Conv(conv3x3(ch, ch, vb.pp("op"))?) } else { Self::AvgPool })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(conv) => conv.forward_stride_2(x),
            Self::AvgPool => x.avg_pool2d(2),
        }
    }
}

/// `Upsample`: nearest ×2, then optionally a 3×3 conv (`conv`).
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    conv: Option<Conv3x3>,
}

impl Upsample {
    pub fn new(ch: usize, use_conv: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: if use_conv { Some(conv3x3(ch, ch, vb.pp("conv"))?) } else { None } })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.conv {
            Some(conv) => conv.forward_upsampled_2x(x),
            None => nearest_2x(x),
        }
    }
}

/// Nearest-neighbour ×2 by broadcasting: exact, and its backward is a plain sum.
pub(crate) fn nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_is_cos_then_sin_of_raw_t() {
        let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        let emb: Vec<f32> = timestep_embedding(&t, 5).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // half = 2, freqs = [1, 10000^-1/2]
        let f1 = (-(10000f32.ln()) / 2.0).exp();
        let expect = [0.5f32.cos(), (0.5 * f1).cos(), 0.5f32.sin(), (0.5 * f1).sin(), 0.0];
        for (a, b) in emb.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{emb:?}");
        }
    }

    #[test]
    fn nearest_2x_repeats_pixels() {
        let x = Tensor::arange(0f32, 4.0, &Device::Cpu).unwrap().reshape((1, 1, 2, 2)).unwrap();
        let up: Vec<Vec<f32>> = nearest_2x(&x).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(up[0], vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(up[3], vec![2.0, 2.0, 3.0, 3.0]);
    }
}

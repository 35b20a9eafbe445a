//! GroupNorm for the UNet. On the CPU in f32 it is one custom op — statistics in one pass per
//! group (f64 accumulators), normalise-and-affine in a second — instead of candle_nn's chain
//! of eight tensor ops; its backward is the textbook GroupNorm gradient written in tensor ops.
//! Elsewhere it is `candle_nn::GroupNorm`.
//!
//! `forward_silu` is what every ResBlock and the output head run: SiLU(GN(x)), with the
//! optional timestep scale-shift `·(1 + scale) + shift` folded into each (item, channel)'s
//! affine. For inference (no input tracks gradients) on the CPU in f32 that is one pass over
//! the output with a vectorised exp (`silu.rs`), where the tensor ops make four (candle's SiLU
//! calls libm's expf element by element); with gradients it is the tensor ops.


use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    fallback: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        let fallback = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { weight, bias, groups, eps, fallback })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            group_norm(x, &self.weight, &self.bias, self.groups, self.eps)
        } else {
            self.fallback.forward(x)
        }
    }
}

impl GroupNorm {
    /// SiLU(GN(x)) or, with `modulation` = (scale, shift) of shape [B, C] (or [B, C, 1, 1]),
    /// SiLU(GN(x)·(1 + scale) + shift).
    pub fn forward_silu(&self, x: &Tensor, modulation: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let modulation = match modulation {
            Some((scale, shift)) => Some((scale.reshape((b, c))?, shift.reshape((b, c))?)),
            None => None,
        };
        let mut inputs = vec![x, &self.weight, &self.bias];
        if let Some((scale, shift)) = &modulation {
            inputs.extend([scale, shift]);
        }
        let tracked = inputs.iter().any(|t| t.track_op());
        if x.device().is_cpu() && x.dtype() == DType::F32 && !tracked {
            // Per (item, channel): out = SiLU(x̂ · gain + offset), x̂ normalised by group.
            let (gain, offset) = match &modulation {
                Some((scale, shift)) => {
                    let factor = (scale + 1.0)?;
                    (factor.broadcast_mul(&self.weight.unsqueeze(0)?)?, (factor.broadcast_mul(&self.bias.unsqueeze(0)?)? + shift)?)
                }
                None => (self.weight.unsqueeze(0)?.broadcast_as((b, c))?, self.bias.unsqueeze(0)?.broadcast_as((b, c))?),
            };
            let op = FusedGroupNorm { groups: self.groups, eps: self.eps, silu: true };
            return x.contiguous()?.apply_op3(&gain.contiguous()?, &offset.contiguous()?, op);
        }
        let y = self.forward(x)?;
        let y = match &modulation {
            Some((scale, shift)) => {
                let spatial = |t: &Tensor| -> Result<Tensor> {
                    let mut shape = vec![b, c];
                    shape.resize(x.rank(), 1);
                    t.reshape(shape)
                };
                y.broadcast_mul(&spatial(&(scale + 1.0)?)?)?.broadcast_add(&spatial(shift)?)?
            }
            None => y,
        };
        y.silu()
    }
}

/// GroupNorm of x [B, C, ...] with per-channel `weight` and `bias` [C]: the fused kernel on
/// the CPU in f32, candle_nn's GroupNorm elsewhere.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = FusedGroupNorm { groups, eps, silu: false };
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
    } else {
        let channels = weight.dim(0)?;
        candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?.forward(x)
    }
}

/// Weight and bias are [C] (plain GroupNorm) or, with `silu`, a gain and offset per (item,
/// channel) [B, C] followed by SiLU (inference only: no backward).
struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("group_norm: {what} must be f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("group_norm: {what} must be contiguous"),
    }
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-fused"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        if dims.len() < 3 {
            candle_core::bail!("group_norm: input rank must be at least 3, got {dims:?}");
        }
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let affine_dims = if self.silu { vec![dims[0], c] } else { vec![c] };
        if !c.is_multiple_of(self.groups) || l2.shape().dims() != affine_dims || l3.shape().dims() != affine_dims {
            candle_core::bail!("group_norm: {} groups, input {dims:?}, weight {:?}", self.groups, l2.shape().dims());
        }
        if l1.shape().elem_count() == 0 {
            candle_core::bail!("group_norm: empty input {dims:?}");
        }
        let x = slice(s1, l1, "input")?;
        let gamma = slice(s2, l2, "weight")?;
        let beta = slice(s3, l3, "bias")?;
        let per_group = c / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(g, (dst, src))| {
            // Two passes (mean, then squared deviations) so a large mean cannot cancel the
            // variance; f32 partial sums over short runs, f64 across them.
            let n = group_len as f64;
            let sum: f64 = src.chunks(1024).map(|run| run.iter().sum::<f32>() as f64).sum();
            let mean = sum / n;
            let mean_f32 = mean as f32;
            let sq: f64 = src
                .chunks(1024)
                .map(|run| run.iter().map(|&v| (v - mean_f32) * (v - mean_f32)).sum::<f32>() as f64)
                .sum();
            let var = sq / n;
            let inv_std = 1.0 / (var + self.eps).sqrt();
            // Channel index into weight/bias: per channel, or per (item, channel) with SiLU.
            let first_channel = if self.silu { g * per_group } else { (g % self.groups) * per_group };
            for (k, (d, s)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
                let ch = first_channel + k;
                let scale = (inv_std * gamma[ch] as f64) as f32;
                let shift = (beta[ch] as f64 - mean * inv_std * gamma[ch] as f64) as f32;
                if self.silu {
                    super::silu::affine_silu(d, s, scale, shift);
                } else {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = v * scale + shift;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, _beta: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.silu {
            // `forward_silu` takes this op only when no input tracks gradients.
            candle_core::bail!("group_norm + SiLU: the fused inference kernel has no backward pass");
        }
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let g = self.groups;
        let grouped = (b, g, (c / g) * spatial);
        let xg = x.reshape(grouped)?;
        let mean = xg.mean_keepdim(2)?;
        let centered = xg.broadcast_sub(&mean)?;
        let inv_std = (centered.sqr()?.mean_keepdim(2)? + self.eps)?.sqrt()?.recip()?;
        let x_hat = centered.broadcast_mul(&inv_std)?; // [B, G, n]
        let channel_shape = {
            let mut s = vec![1; dims.len()];
            s[1] = c;
            s
        };
        let grad_beta = grad.sum_keepdim(0)?.flatten_from(2)?.sum(2)?.flatten_all()?;
        let x_hat_full = x_hat.reshape(dims.as_slice())?;
        let grad_gamma = (grad * &x_hat_full)?.sum_keepdim(0)?.flatten_from(2)?.sum(2)?.flatten_all()?;
        // dx = inv_std · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)) per group, dx̂ = grad · γ.
        let dx_hat = grad.broadcast_mul(&gamma.reshape(channel_shape)?)?.reshape(grouped)?;
        let term_1 = dx_hat.mean_keepdim(2)?;
        let term_2 = (&dx_hat * &x_hat)?.mean_keepdim(2)?;
        let grad_x = dx_hat
            .broadcast_sub(&term_1)?
            .sub(&x_hat.broadcast_mul(&term_2)?)?
            .broadcast_mul(&inv_std)?
            .reshape(dims.as_slice())?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_silu_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        let (b, c) = (2usize, 8usize);
        for spatial in [vec![5usize, 7], vec![9], vec![33, 17]] {
            let mut dims = vec![b, c];
            dims.extend(&spatial);
            let x = (Tensor::randn(0f32, 3.0, dims.as_slice(), &dev).unwrap() + 1.0).unwrap();
            let gamma = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let beta = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            let norm = GroupNorm {
                weight: gamma.clone(),
                bias: beta.clone(),
                groups: 2,
                eps: 1e-5,
                fallback: candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, 2, 1e-5).unwrap(),
            };
            let scale = Tensor::randn(0f32, 1.0, (b, c), &dev).unwrap();
            let shift = Tensor::randn(0f32, 4.0, (b, c), &dev).unwrap();
            for modulation in [None, Some((&scale, &shift))] {
                let fused = norm.forward_silu(&x, modulation).unwrap();
                // A variable input takes the tensor-op path.
                let tracked = Var::from_tensor(&x).unwrap();
                let reference = norm.forward_silu(tracked.as_tensor(), modulation).unwrap();
                assert!(reference.track_op());
                let d = max_diff(&fused, &reference);
                assert!(d < 1e-5, "{dims:?} modulation {}: differs by {d}", modulation.is_some());
            }
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn matches_candle_group_norm_forward_and_backward() {
        let dev = Device::Cpu;
        for dims in [vec![2usize, 8, 5, 7], vec![1, 4, 9]] {
            let c = dims[1];
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, dims.as_slice(), &dev).unwrap() + 3.0).unwrap()).unwrap();
            let gamma = Var::randn(1f32, 0.5, c, &dev).unwrap();
            let beta = Var::randn(0f32, 0.5, c, &dev).unwrap();
            let ours = GroupNorm {
                weight: gamma.as_tensor().clone(),
                bias: beta.as_tensor().clone(),
                groups: 2,
                eps: 1e-5,
                fallback: candle_nn::GroupNorm::new(gamma.as_tensor().clone(), beta.as_tensor().clone(), c, 2, 1e-5).unwrap(),
            };
            let y = ours.forward(x.as_tensor()).unwrap();
            let y_ref = ours.fallback.forward(x.as_tensor()).unwrap();
            assert!(max_diff(&y, &y_ref) < 1e-4, "forward {dims:?}");
            let probe = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (y_ref * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &gamma, &beta] {
                let d = max_diff(g.get(v.as_tensor()).unwrap(), g_ref.get(v.as_tensor()).unwrap());
                assert!(d < 1e-3, "{dims:?}: gradient differs by {d}");
            }
        }
    }
}

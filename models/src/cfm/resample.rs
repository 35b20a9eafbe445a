//! Resizing the low-resolution latent to the target size (z_up): `bilinear` and `nearest`
//! exactly as PyTorch's `F.interpolate(size=...)` (align_corners=False, no antialias), and
//! `psu` (pixel-space upsampling through the autoencoder).
//!
//! Bilinear is two small interpolation matrices applied by matmul: exact, differentiable
//! (candle's `upsample_bilinear2d` has no backward) and fast. Nearest is an `index_select`.

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How z_up is made from the low-resolution latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpsampleMode {
    Bilinear,
    Nearest,
    /// Decode, resize the image bilinearly, encode to the posterior mean.
    Psu,
}

impl std::str::FromStr for UpsampleMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bilinear" => Ok(Self::Bilinear),
            "nearest" => Ok(Self::Nearest),
            "psu" => Ok(Self::Psu),
            other => Err(format!("upsample mode `{other}`: expected `bilinear`, `nearest` or `psu`")),
        }
    }
}

impl std::fmt::Display for UpsampleMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bilinear => "bilinear",
            Self::Nearest => "nearest",
            Self::Psu => "psu",
        })
    }
}

/// The first-stage autoencoder as the CFM sees it. Latents are in the *scaled* latent space
/// the CFM works in (for SD: posterior mean × 0.18215), images are [B, 3, H, W] in [−1, 1].
pub trait LatentCodec {
    /// Image → posterior mean of the latent, scaled.
    fn encode(&self, image: &Tensor) -> Result<Tensor>;
    /// Scaled latent → image.
    fn decode(&self, latent: &Tensor) -> Result<Tensor>;
}

/// Resizes `z` [B, C, h, w] to `target_hw` with `mode`. `psu` needs the `codec`; the image is
/// resized by the same factor as the latent.
pub fn upsample(z: &Tensor, mode: UpsampleMode, target_hw: (usize, usize), codec: Option<&dyn LatentCodec>) -> Result<Tensor> {
    match mode {
        UpsampleMode::Bilinear => bilinear_resize(z, target_hw),
        UpsampleMode::Nearest => nearest_resize(z, target_hw),
        UpsampleMode::Psu => {
            let Some(codec) = codec else {
                bail!("upsample mode `psu` needs an autoencoder (none was given)");
            };
            let (_, _, h, w) = z.dims4()?;
            let (th, tw) = target_hw;
            let image = codec.decode(z)?;
            let (_, _, ih, iw) = image.dims4()?;
            if (ih * th) % h != 0 || (iw * tw) % w != 0 {
                bail!("psu: decoded image {ih}×{iw} cannot be resized by the latent's factor {h}×{w} → {th}×{tw}");
            }
            let image_up = bilinear_resize(&image, (ih * th / h, iw * tw / w))?;
            let z_up = codec.encode(&image_up)?;
            if z_up.dims()[2..] != [th, tw] {
                bail!("psu: the encoder returned {:?}, expected spatial size {th}×{tw}", z_up.dims());
            }
            Ok(z_up)
        }
    }
}

/// PyTorch's bilinear source weights for one axis, align_corners=False, as an [out, in]
/// matrix (each row holds at most two non-zeros summing to 1).
fn bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    // PyTorch computes in the tensor's accumulate type (f32 on the CPU for f32 tensors).
    let scale = input as f32 / output as f32;
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(input - 1);
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        m[o * input + i0] += l0;
        m[o * input + i1] += l1;
    }
    m
}

/// `F.interpolate(x, size=target_hw, mode="bilinear", align_corners=False)`.
pub fn bilinear_resize(x: &Tensor, target_hw: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (th, tw) = target_hw;
    if th == 0 || tw == 0 {
        bail!("bilinear resize to {th}×{tw}: sizes must be > 0");
    }
    let dev = x.device();
    // Interpolation weights are built in f32 and applied in f32 (also for half inputs).
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let rows = Tensor::from_vec(bilinear_matrix(h, th), (th, h), dev)?;
    let cols_t = Tensor::from_vec(bilinear_matrix(w, tw), (tw, w), dev)?.t()?.contiguous()?;
    // x [B, C, h, w] · colsᵀ [w, tw] → [B, C, h, tw]; rows [th, h] · that → [B, C, th, tw].
    let across = x.broadcast_matmul(&cols_t)?;
    rows.broadcast_matmul(&across)?.to_dtype(dtype)
}

/// `F.interpolate(x, size=target_hw, mode="nearest")`: source index floor(dst · in/out).
pub fn nearest_resize(x: &Tensor, target_hw: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (th, tw) = target_hw;
    if th == 0 || tw == 0 {
        bail!("nearest resize to {th}×{tw}: sizes must be > 0");
    }
    let index = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let ids: Vec<u32> = (0..output).map(|o| ((o as f32 * scale).floor() as usize).min(input - 1) as u32).collect();
        Tensor::from_vec(ids, output, x.device())
    };
    x.index_select(&index(h, th)?, 2)?.index_select(&index(w, tw)?, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bilinear_2x_matches_pytorch_on_a_ramp() {
        // torch: F.interpolate(torch.tensor([[[[0., 1., 2.]]]]), size=(1, 6), mode="bilinear")
        //   → [0.0, 0.25, 0.75, 1.25, 1.75, 2.0]
        let x = Tensor::new(&[[[[0f32, 1.0, 2.0]]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = bilinear_resize(&x, (1, 6)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn nearest_picks_floor_of_scaled_index() {
        let x = Tensor::new(&[[[[0f32, 1.0, 2.0]]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = nearest_resize(&x, (2, 7)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // scale 3/7: floor(o · 0.4286) for o = 0..7 → 0 0 0 1 1 2 2, two identical rows.
        assert_eq!(&y[..7], &[0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&y[..7], &y[7..]);
    }

    /// A stand-in autoencoder: decode = nearest ×4, encode = 4×4 average pool.
    struct BoxCodec;
    impl LatentCodec for BoxCodec {
        fn encode(&self, image: &Tensor) -> Result<Tensor> {
            image.avg_pool2d(4)
        }
        fn decode(&self, latent: &Tensor) -> Result<Tensor> {
            let (_, _, h, w) = latent.dims4()?;
            nearest_resize(latent, (4 * h, 4 * w))
        }
    }

    #[test]
    fn psu_goes_through_pixel_space_and_needs_a_codec() {
        let z = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu).unwrap();
        let err = upsample(&z, UpsampleMode::Psu, (8, 10), None).unwrap_err().to_string();
        assert!(err.contains("psu"), "{err}");
        let up = upsample(&z, UpsampleMode::Psu, (8, 10), Some(&BoxCodec)).unwrap();
        assert_eq!(up.dims(), &[2, 3, 8, 10]);
        // decode → 16×20, bilinear → 32×40, avg-pool 4 → 8×10: equals the composition.
        let expect = bilinear_resize(&nearest_resize(&z, (16, 20)).unwrap(), (32, 40)).unwrap().avg_pool2d(4).unwrap();
        let diff = (up - expect).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn bilinear_has_a_backward_pass() {
        let var = candle_core::Var::randn(0f32, 1.0, (1, 2, 3, 3), &Device::Cpu).unwrap();
        let loss = bilinear_resize(var.as_tensor(), (6, 6)).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        // Each input pixel's weights over the output sum to (6/3)² = 4.
        let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|v| (v - 4.0).abs() < 1e-5), "{g:?}");
    }
}

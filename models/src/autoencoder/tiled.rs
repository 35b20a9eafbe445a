//! Tiled decoding: the latent is cut into overlapping tiles, each decoded on its own, and the
//! pixels blended with weights that ramp linearly across every overlap, so the output is a
//! continuous mix of neighbouring tiles (no seam). The image is accumulated on the CPU as the
//! tiles come in, so device memory follows the tile size, not the image size.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::progress::{self, Progress, RunError};

/// Tiling settings, in latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileConfig {
    /// Side of a square tile (64 = a 512 px tile for kl-f8).
    pub tile: usize,
    /// How far neighbouring tiles overlap; the blend ramps across it.
    pub overlap: usize,
    /// [`super::Autoencoder::decode`] tiles when either side of the latent exceeds this.
    pub auto_above: usize,
}

impl Default for TileConfig {
    fn default() -> Self {
        Self { tile: 64, overlap: 16, auto_above: 96 }
    }
}

impl TileConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.tile == 0 {
            return Err("tile must be at least 1 latent pixel".into());
        }
        if self.overlap >= self.tile {
            return Err(format!("overlap {} must be smaller than tile {}", self.overlap, self.tile));
        }
        Ok(())
    }

    pub fn should_tile(&self, height: usize, width: usize) -> bool {
        height > self.auto_above || width > self.auto_above
    }

    /// Tile origins along a side of `len` latent pixels: every `tile − overlap`, the last one
    /// moved back so it ends at the border (all tiles full-size, overlaps ≥ `overlap`).
    pub fn origins(&self, len: usize) -> Vec<usize> {
        if len <= self.tile {
            return vec![0];
        }
        let stride = self.tile - self.overlap;
        let mut origins: Vec<usize> = (0..).map(|i| i * stride).take_while(|&o| o + self.tile < len).collect();
        origins.push(len - self.tile);
        origins.dedup();
        origins
    }
}

/// Blend weight of each of `len` pixels of a tile: a linear ramp over `blend` pixels on every
/// side that has a neighbouring tile, 1 elsewhere.
fn ramp(len: usize, blend: usize, ramp_start: bool, ramp_end: bool) -> Vec<f32> {
    if blend == 0 {
        return vec![1.0; len];
    }
    (0..len)
        .map(|i| {
            let up = if ramp_start && i < blend { (i as f32 + 0.5) / blend as f32 } else { 1.0 };
            let down = if ramp_end && i + blend >= len { (len - i) as f32 - 0.5 } else { blend as f32 };
            up.min(down / blend as f32)
        })
        .collect()
}

/// Decodes `z` (B, C, H, W) tile by tile with `decode_tile`, which maps a latent tile to a
/// (B, C', h·f, w·f) image tile; returns the blended (B, C', H·f, W·f) image on the CPU.
/// `(y0, x0, height, width)` of every latent tile, row by row.
pub(super) fn tile_rects(height: usize, width: usize, tiles: &TileConfig) -> Vec<(usize, usize, usize, usize)> {
    let cols = tiles.origins(width);
    tiles
        .origins(height)
        .into_iter()
        .flat_map(|y0| cols.iter().map(move |&x0| (y0, x0, tiles.tile.min(height - y0), tiles.tile.min(width - x0))))
        .collect()
}

/// The tiles GroupNorm statistics are measured on: all of them up to 3 per side, else 3
/// evenly spread (first, middle, last) per side.
pub(super) fn stat_sample(height: usize, width: usize, tiles: &TileConfig) -> Vec<(usize, usize, usize, usize)> {
    let spread = |origins: Vec<usize>| -> Vec<usize> {
        if origins.len() <= 3 {
            return origins;
        }
        let last = origins.len() - 1;
        let mut picked = vec![origins[0], origins[last / 2], origins[last]];
        picked.dedup();
        picked
    };
    let cols = spread(tiles.origins(width));
    spread(tiles.origins(height))
        .into_iter()
        .flat_map(|y0| cols.iter().map(move |&x0| (y0, x0, tiles.tile.min(height - y0), tiles.tile.min(width - x0))))
        .collect()
}

/// Steps `first_step + 1 ..` of `total_steps` are reported to `progress`, one per tile.
pub(super) fn decode(
    z: &Tensor,
    tiles: &TileConfig,
    factor: usize,
    progress: Progress,
    (first_step, total_steps): (usize, usize),
    decode_tile: impl Fn(&Tensor) -> Result<Tensor>,
) -> std::result::Result<Tensor, RunError> {
    let (batch, _, height, width) = z.dims4()?;
    let (out_h, out_w) = (height * factor, width * factor);
    let blend = tiles.overlap * factor;
    let mut weight_sum = vec![0f32; out_h * out_w];
    let mut acc: Vec<f32> = Vec::new();
    let mut channels = 0;
    for (done, (y0, x0, th, tw)) in tile_rects(height, width, tiles).into_iter().enumerate() {
        let tile = z.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
        let image = decode_tile(&tile)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let (_, c, ih, iw) = image.dims4()?;
        if (ih, iw) != (th * factor, tw * factor) {
            return Err(candle_core::Error::msg(format!(
                "a {th}x{tw} latent tile decoded to {ih}x{iw} pixels, expected {}x{}",
                th * factor,
                tw * factor
            ))
            .into());
        }
        if acc.is_empty() {
            channels = c;
            acc = vec![0f32; batch * c * out_h * out_w];
        }
        let wy = ramp(ih, blend, y0 > 0, y0 + th < height);
        let wx = ramp(iw, blend, x0 > 0, x0 + tw < width);
        let (py, px) = (y0 * factor, x0 * factor);
        for (y, &wy) in wy.iter().enumerate() {
            let row = &mut weight_sum[(py + y) * out_w + px..][..iw];
            for (sum, &wx) in row.iter_mut().zip(&wx) {
                *sum += wy * wx;
            }
        }
        let pixels = image.flatten_all()?.to_vec1::<f32>()?;
        for plane in 0..batch * c {
            let src = &pixels[plane * ih * iw..][..ih * iw];
            let dst = &mut acc[plane * out_h * out_w..][..out_h * out_w];
            for (y, &wy) in wy.iter().enumerate() {
                let dst_row = &mut dst[(py + y) * out_w + px..][..iw];
                for ((d, &s), &wx) in dst_row.iter_mut().zip(&src[y * iw..][..iw]).zip(&wx) {
                    *d += s * wy * wx;
                }
            }
        }
        drop(pixels);
        progress::report(progress, first_step + done + 1, total_steps)?;
    }
    for plane in acc.chunks_mut(out_h * out_w) {
        for (v, &w) in plane.iter_mut().zip(&weight_sum) {
            *v /= w;
        }
    }
    Ok(Tensor::from_vec(acc, (batch, channels, out_h, out_w), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Flow, Step};

    #[test]
    fn origins_cover_the_side_with_full_tiles() {
        let t = TileConfig { tile: 24, overlap: 8, auto_above: 0 };
        assert_eq!(t.origins(20), vec![0]);
        assert_eq!(t.origins(40), vec![0, 16]);
        assert_eq!(t.origins(50), vec![0, 16, 26]);
        assert_eq!(t.origins(24), vec![0]);
    }

    #[test]
    fn statistics_come_from_at_most_three_tiles_per_side() {
        let t = TileConfig { tile: 64, overlap: 16, auto_above: 0 };
        assert_eq!(t.origins(256), vec![0, 48, 96, 144, 192]);
        let sample = stat_sample(256, 256, &t);
        assert_eq!(sample.len(), 9);
        assert!(sample.contains(&(96, 192, 64, 64)));
        let small = TileConfig { tile: 24, overlap: 8, auto_above: 0 };
        assert_eq!(stat_sample(40, 56, &small), tile_rects(40, 56, &small));
    }

    #[test]
    fn ramps_only_towards_neighbours() {
        assert_eq!(ramp(4, 2, false, false), vec![1.0; 4]);
        assert_eq!(ramp(4, 2, true, false), vec![0.25, 0.75, 1.0, 1.0]);
        assert_eq!(ramp(4, 2, false, true), vec![1.0, 1.0, 0.75, 0.25]);
    }

    /// A position-wise "decoder" (×factor nearest upsampling) must come out exactly as the
    /// untiled result: the blend weights are normalised everywhere.
    #[test]
    fn pointwise_decoder_is_reproduced_exactly() {
        let z = Tensor::randn(0f32, 1., (2, 3, 13, 17), &Device::Cpu).unwrap();
        let up = |t: &Tensor| {
            let (_, _, h, w) = t.dims4()?;
            t.upsample_nearest2d(2 * h, 2 * w)
        };
        let tiles = TileConfig { tile: 6, overlap: 2, auto_above: 0 };
        let n = tile_rects(13, 17, &tiles).len();
        let tiled = decode(&z, &tiles, 2, &mut progress::ignore, (0, n), up).unwrap();
        let full = up(&z).unwrap();
        let diff = (tiled - full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn progress_can_stop_between_tiles() {
        let z = Tensor::zeros((1, 1, 10, 10), DType::F32, &Device::Cpu).unwrap();
        let tiles = TileConfig { tile: 4, overlap: 1, auto_above: 0 };
        let mut seen = Vec::new();
        let mut stop_after_two = |s: Step| {
            seen.push(s);
            if s.step == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        };
        let err = decode(&z, &tiles, 1, &mut stop_after_two, (0, 9), |t| Ok(t.clone())).unwrap_err();
        assert!(err.is_cancelled());
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].total, 9);
    }
}

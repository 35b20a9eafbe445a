//! Training data: random multi-scale crops of the training photos, and latents precomputed
//! from them with a frozen autoencoder (the CFM and base networks train on latents only).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;

use crate::pixels::{self, PixelError};
use crate::rng::NoiseRng;

/// The photos of a folder, loaded once (halved when their shorter side is ≥ 1024 px, as the
/// evaluation does).
pub struct PhotoSet {
    pub names: Vec<String>,
    pub images: Vec<RgbImage>,
}

/// How far a crop may zoom out: a crop of side `s` is taken and resized to `out`, with `s/out`
/// log-uniform in `[min, max]` (and `s` at most the photo's shorter side). `min = max = 1` cuts
/// pixel-exact crops; large values show whole scenes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Zoom {
    pub min: f32,
    pub max: f32,
}

impl PhotoSet {
    pub fn load(dir: &Path) -> Result<Self, PixelError> {
        let files = pixels::image_files(dir)?;
        let mut names = Vec::with_capacity(files.len());
        let mut images = Vec::with_capacity(files.len());
        for file in files {
            images.push(pixels::load_photo(&file)?);
            names.push(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        }
        Ok(Self { names, images })
    }

    /// A random `out × out` crop: a uniformly chosen photo, zoom, position, and a horizontal
    /// flip with probability ½. Zoomed crops are resized with a triangle (antialiasing) filter.
    pub fn random_crop(&self, rng: &mut NoiseRng, out: u32, zoom: Zoom) -> RgbImage {
        let r = rng.inner();
        let img = &self.images[r.random_range(0..self.images.len())];
        let short = img.width().min(img.height());
        let (lo, hi) = (zoom.min.max(1.0).ln(), zoom.max.max(zoom.min).max(1.0).ln());
        let f = if hi > lo { r.random_range(lo..=hi).exp() } else { lo.exp() };
        let side = ((out as f32 * f).round() as u32).clamp(out.min(short), short);
        let x = r.random_range(0..=img.width() - side);
        let y = r.random_range(0..=img.height() - side);
        let flip = r.random_bool(0.5);
        let crop = image::imageops::crop_imm(img, x, y, side, side).to_image();
        let crop = if side == out { crop } else { image::imageops::resize(&crop, out, out, image::imageops::FilterType::Triangle) };
        if flip { image::imageops::flip_horizontal(&crop) } else { crop }
    }

    /// A `[B, 3, out, out]` batch of random crops in [-1, 1].
    pub fn batch(&self, rng: &mut NoiseRng, batch: usize, out: u32, zoom: Zoom, device: &Device) -> candle_core::Result<Tensor> {
        let crops: Vec<RgbImage> = (0..batch).map(|_| self.random_crop(rng, out, zoom)).collect();
        pixels::to_tensor(&crops.iter().collect::<Vec<_>>(), device)
    }
}

/// Image → scaled latent (the posterior mean × the latent scale), `[B, 3, H, W]` in [-1, 1] to
/// `[B, C, H/8, W/8]`. The frozen first stage as the latent trainers see it.
pub trait LatentEncoder {
    fn encode(&self, image: &Tensor) -> candle_core::Result<Tensor>;
}

/// Precomputed training latents: `high` `[N, C, H, W]` and, for CFM hops, `low`
/// `[N, C, H/f, W/f]`, the latent of the same crop box-downsampled by the hop factor `f`.
pub struct LatentSet {
    pub high: Tensor,
    pub low: Option<Tensor>,
}

impl LatentSet {
    /// Encodes `count` random crops of side `size` (and, with `factor`, their downsampled
    /// versions) in batches of `batch`. Deterministic in `rng`.
    #[allow(clippy::too_many_arguments)]
    pub fn precompute(
        photos: &PhotoSet,
        encoder: &dyn LatentEncoder,
        rng: &mut NoiseRng,
        count: usize,
        size: u32,
        zoom: Zoom,
        factor: Option<u32>,
        batch: usize,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> candle_core::Result<Self> {
        let (mut high, mut low) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < count {
            let n = batch.min(count - done);
            let crops: Vec<RgbImage> = (0..n).map(|_| photos.random_crop(rng, size, zoom)).collect();
            high.push(encoder.encode(&pixels::to_tensor(&crops.iter().collect::<Vec<_>>(), device)?)?.to_device(&Device::Cpu)?);
            if let Some(f) = factor {
                let small: Vec<RgbImage> = crops.iter().map(|c| pixels::area_downsample(c, f)).collect();
                low.push(encoder.encode(&pixels::to_tensor(&small.iter().collect::<Vec<_>>(), device)?)?.to_device(&Device::Cpu)?);
            }
            done += n;
            progress(done, count);
        }
        let high = Tensor::cat(&high, 0)?;
        let low = if factor.is_some() { Some(Tensor::cat(&low, 0)?) } else { None };
        Ok(Self { high, low })
    }

    pub fn len(&self) -> usize {
        self.high.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Saves as safetensors (`high`, optional `low`) with `metadata` describing how it was made.
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> candle_core::Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut tensors = vec![("high", self.high.contiguous()?)];
        if let Some(low) = &self.low {
            tensors.push(("low", low.contiguous()?));
        }
        safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Loads a set saved by [`LatentSet::save`] if its metadata equals `metadata` (same photos,
    /// autoencoder, sizes and seed); `Ok(None)` when the file is missing or stale.
    pub fn load_if_matching(path: &Path, metadata: &HashMap<String, String>) -> candle_core::Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(path)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        if header.metadata().as_ref() != Some(metadata) {
            return Ok(None);
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let high = tensors.remove("high").ok_or_else(|| candle_core::Error::Msg(format!("{}: no `high`", path.display())))?;
        Ok(Some(Self { high, low: tensors.remove("low") }))
    }

    /// A random batch (with replacement): `(high, low)` rows of the same indices, on `device`.
    pub fn batch(&self, rng: &mut NoiseRng, batch: usize, device: &Device) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let n = self.len();
        if n == 0 {
            candle_core::bail!("latent set is empty");
        }
        let idx: Vec<u32> = (0..batch).map(|_| rng.inner().random_range(0..n) as u32).collect();
        let idx = Tensor::from_vec(idx, batch, &Device::Cpu)?;
        let high = self.high.index_select(&idx, 0)?.to_device(device)?;
        let low = self.low.as_ref().map(|l| l.index_select(&idx, 0)?.to_device(device)).transpose()?;
        Ok((high, low))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{rng_for, Stream};

    /// 8× average pooling: a stand-in first stage with the right shapes.
    struct Pool;
    impl LatentEncoder for Pool {
        fn encode(&self, image: &Tensor) -> candle_core::Result<Tensor> {
            image.avg_pool2d(8)
        }
    }

    fn photos() -> PhotoSet {
        let img = RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, (x + y) as u8]));
        PhotoSet { names: vec!["a".into()], images: vec![img] }
    }

    #[test]
    fn crops_have_the_size_asked_and_stay_inside() {
        let set = photos();
        let mut rng = rng_for(1, Stream::Train);
        for zoom in [Zoom { min: 1.0, max: 1.0 }, Zoom { min: 1.0, max: 50.0 }] {
            for _ in 0..20 {
                assert_eq!(set.random_crop(&mut rng, 64, zoom).dimensions(), (64, 64));
            }
        }
        // Pixel-exact crops copy pixels: the red channel is x, so neighbours differ by ±1.
        let crop = set.random_crop(&mut rng, 16, Zoom { min: 1.0, max: 1.0 });
        let d = crop.get_pixel(1, 0)[0] as i32 - crop.get_pixel(0, 0)[0] as i32;
        assert_eq!(d.abs(), 1);
    }

    #[test]
    fn precomputed_latents_are_deterministic_and_cached_by_metadata() {
        let set = photos();
        let zoom = Zoom { min: 1.0, max: 2.0 };
        let make = || {
            let mut rng = rng_for(3, Stream::Train);
            LatentSet::precompute(&set, &Pool, &mut rng, 5, 32, zoom, Some(2), 2, &Device::Cpu, &mut |_, _| {}).unwrap()
        };
        let a = make();
        assert_eq!(a.high.dims(), &[5, 3, 4, 4]);
        assert_eq!(a.low.as_ref().unwrap().dims(), &[5, 3, 2, 2]);
        let b = make();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&a.high), flat(&b.high));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache/lat.safetensors");
        let meta = HashMap::from([("seed".to_string(), "3".to_string())]);
        a.save(&path, meta.clone()).unwrap();
        let loaded = LatentSet::load_if_matching(&path, &meta).unwrap().unwrap();
        assert_eq!(flat(&loaded.low.unwrap()), flat(a.low.as_ref().unwrap()));
        let other = HashMap::from([("seed".to_string(), "4".to_string())]);
        assert!(LatentSet::load_if_matching(&path, &other).unwrap().is_none());

        let mut rng = rng_for(0, Stream::Train);
        let (hi, lo) = a.batch(&mut rng, 3, &Device::Cpu).unwrap();
        assert_eq!((hi.dims()[0], lo.unwrap().dims()[0]), (3, 3));
    }
}

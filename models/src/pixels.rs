//! 8-bit RGB photos: loading (any PNG/JPEG, grey or with alpha), the resolution rules of
//! training and evaluation, box-filter ("area") downsampling, crops, and conversion to and
//! from the [-1, 1] tensors the autoencoder takes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// Shorter sides at or above this are halved first: wallpaper-sized photos carry JPEG
/// artifacts and less detail per pixel than their size suggests (issue D, evaluation).
pub const HALVE_AT_SHORT_SIDE: u32 = 1024;

/// Errors of loading photos.
#[derive(Debug, thiserror::Error)]
pub enum PixelError {
    #[error("image `{path}`: {source}")]
    Decode { path: PathBuf, source: image::ImageError },
    #[error("folder `{path}`: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("folder `{path}` holds no PNG or JPEG files")]
    Empty { path: PathBuf },
}

/// Reads a PNG or JPEG as 8-bit RGB: grey is replicated, alpha is composited over black
/// (what the pixels show once the transparency is dropped), 16-bit is rounded to 8 bits.
pub fn load_rgb(path: &Path) -> Result<RgbImage, PixelError> {
    let decoded = image::ImageReader::open(path)
        .map_err(|e| PixelError::Decode { path: path.to_owned(), source: e.into() })?
        .with_guessed_format()
        .map_err(|e| PixelError::Decode { path: path.to_owned(), source: e.into() })?
        .decode()
        .map_err(|e| PixelError::Decode { path: path.to_owned(), source: e })?;
    if decoded.color().has_alpha() {
        let rgba = decoded.to_rgba8();
        let mut rgb = RgbImage::new(rgba.width(), rgba.height());
        for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
            let a = src[3] as u32;
            for c in 0..3 {
                dst[c] = ((src[c] as u32 * a + 127) / 255) as u8;
            }
        }
        Ok(rgb)
    } else {
        Ok(decoded.to_rgb8())
    }
}

/// The PNG/JPEG files of a folder (by extension, case-insensitive), sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, PixelError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PixelError::Dir { path: dir.to_owned(), source: e })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| PixelError::Dir { path: dir.to_owned(), source: e })?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        if path.is_file() && matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(PixelError::Empty { path: dir.to_owned() });
    }
    files.sort();
    Ok(files)
}

/// Loads a photo and applies the resolution rule: halved (2×2 box filter) when its shorter
/// side is at least [`HALVE_AT_SHORT_SIDE`].
pub fn load_photo(path: &Path) -> Result<RgbImage, PixelError> {
    let img = load_rgb(path)?;
    Ok(if img.width().min(img.height()) >= HALVE_AT_SHORT_SIDE { area_downsample(&img, 2) } else { img })
}

/// Box-filter downsampling by an integer factor: each output pixel is the rounded mean of a
/// `factor × factor` block (the same as `F.interpolate(mode="area")` for integer factors).
/// A right/bottom remainder smaller than `factor` is dropped.
pub fn area_downsample(img: &RgbImage, factor: u32) -> RgbImage {
    assert!(factor >= 1, "area_downsample factor must be ≥ 1");
    let (w, h) = (img.width() / factor, img.height() / factor);
    let n = (factor * factor) as u32;
    RgbImage::from_fn(w, h, |x, y| {
        let mut sum = [0u32; 3];
        for dy in 0..factor {
            for dx in 0..factor {
                let p = img.get_pixel(x * factor + dx, y * factor + dy);
                for c in 0..3 {
                    sum[c] += p[c] as u32;
                }
            }
        }
        image::Rgb(sum.map(|s| ((s + n / 2) / n) as u8))
    })
}

/// Up to `max` non-overlapping `size × size` crops from a centred grid, in raster order; when
/// the grid has more cells than `max`, evenly spaced cells are taken so the crops cover the
/// whole photo rather than its top rows.
pub fn grid_crops(img: &RgbImage, size: u32, max: usize) -> Vec<RgbImage> {
    let (nx, ny) = (img.width() / size, img.height() / size);
    let cells = (nx * ny) as usize;
    if cells == 0 || max == 0 {
        return Vec::new();
    }
    let (x0, y0) = ((img.width() - nx * size) / 2, (img.height() - ny * size) / 2);
    let take = cells.min(max);
    (0..take)
        .map(|k| {
            let cell = (k * cells / take) as u32;
            let (cx, cy) = (cell % nx, cell / nx);
            image::imageops::crop_imm(img, x0 + cx * size, y0 + cy * size, size, size).to_image()
        })
        .collect()
}

/// Stacks images of equal size into a `[B, 3, H, W]` f32 tensor in [-1, 1].
pub fn to_tensor(images: &[&RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let Some(first) = images.first() else {
        candle_core::bail!("to_tensor: no images");
    };
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for img in images {
        if img.dimensions() != (w, h) {
            candle_core::bail!("to_tensor: image {:?} differs from {:?}", img.dimensions(), (w, h));
        }
        for c in 0..3 {
            data.extend(img.pixels().map(|p| p[c] as f32 / 127.5 - 1.0));
        }
    }
    Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), &Device::Cpu)?.to_device(device)
}

/// Turns a `[B, 3, H, W]` tensor in [-1, 1] into 8-bit images: `(v + 1) · 127.5`, rounded half
/// away from zero, clamped to [0, 255]. Every PNG this project writes goes through here, so
/// the rounding is part of its byte-exact output.
pub fn from_tensor(t: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    if c != 3 {
        candle_core::bail!("from_tensor: expected 3 channels, got {c}");
    }
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = (y as usize) * w + x as usize;
                image::Rgb(std::array::from_fn(|ch| {
                    ((values[base + ch * plane + at] + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
                }))
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 7]))
    }

    #[test]
    fn area_downsample_averages_blocks() {
        let img = RgbImage::from_fn(4, 2, |x, _| image::Rgb([if x % 2 == 0 { 10 } else { 21 }, 0, 255]));
        let small = area_downsample(&img, 2);
        assert_eq!(small.dimensions(), (2, 1));
        // (10 + 21 + 10 + 21) / 4 = 15.5 rounds to 16.
        assert_eq!(small.get_pixel(0, 0).0, [16, 0, 255]);
        assert_eq!(area_downsample(&ramp(5, 5), 2).dimensions(), (2, 2));
    }

    #[test]
    fn grid_crops_are_centred_spread_and_capped() {
        let img = ramp(25, 12);
        let crops = grid_crops(&img, 4, 100);
        assert_eq!(crops.len(), 6 * 3);
        // The grid starts at ((25 − 24) / 2, 0) = (0, 0).
        assert_eq!(crops[0].get_pixel(0, 0).0, img.get_pixel(0, 0).0);
        let capped = grid_crops(&img, 4, 4);
        assert_eq!(capped.len(), 4);
        // Cells 0, 4, 9, 13 of 18: the last taken crop is on the bottom row.
        assert_eq!(capped[3].get_pixel(0, 0).0, img.get_pixel(4, 8).0);
        assert!(grid_crops(&img, 16, 8).is_empty());
    }

    #[test]
    fn tensor_round_trip_is_exact_for_8_bit() {
        let img = ramp(6, 4);
        let t = to_tensor(&[&img, &img], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 4, 6]);
        let back = from_tensor(&t).unwrap();
        assert_eq!(back[1], img);
        let odd = ramp(4, 4);
        assert!(to_tensor(&[&img, &odd], &Device::Cpu).is_err());
    }

    #[test]
    fn from_tensor_rounds_half_away_from_zero_and_clamps() {
        // One pixel per channel value: −1, 0 (127.5 → 128), 1, 2 (clamped), −3 (clamped).
        let values = vec![-1f32, 0.0, 1.0, 2.0, -3.0, 0.5];
        let t = Tensor::from_vec(values, (1, 3, 1, 2), &Device::Cpu).unwrap();
        let img = from_tensor(&t).unwrap().remove(0);
        assert_eq!(img.get_pixel(0, 0).0, [0, 255, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [128, 255, 191]);
        assert!(from_tensor(&Tensor::zeros((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn loads_grey_and_rgba_pngs_and_names_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let grey = dir.path().join("grey.png");
        image::GrayImage::from_pixel(3, 2, image::Luma([90])).save(&grey).unwrap();
        assert_eq!(load_rgb(&grey).unwrap().get_pixel(2, 1).0, [90, 90, 90]);
        let rgba = dir.path().join("rgba.png");
        image::RgbaImage::from_pixel(3, 2, image::Rgba([200, 100, 50, 128])).save(&rgba).unwrap();
        assert_eq!(load_rgb(&rgba).unwrap().get_pixel(0, 0).0, [100, 50, 25]);
        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, b"not a jpeg").unwrap();
        let err = load_rgb(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.jpg"), "{err}");
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let files = image_files(dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        let empty = tempfile::tempdir().unwrap();
        assert!(image_files(empty.path()).unwrap_err().to_string().contains("no PNG or JPEG"));
    }
}

//! Evaluation of upscalers on photo crops (issue D, `fmboost eval upscale`).
//!
//! Protocol: every PNG/JPEG of a folder is loaded as RGB, halved when its shorter side is
//! ≥ 1024 px ([`crate::pixels::load_photo`]), cut into up to [`CROPS_PER_IMAGE`] non-overlapping
//! [`CROP`]² crops; the low-res input is the crop box-downsampled by the scale. Each method
//! maps the low-res crop back to [`CROP`]² (or, for a reconstruction ceiling, the high-res crop
//! itself); PSNR and SSIM against the crop are averaged over crops.
//!
//! The models plug in through [`Upscaler`] / [`Reconstructor`]; [`Bicubic`] is the pixel-space
//! baseline.

pub mod metrics;
pub mod report;

use std::path::Path;

use image::RgbImage;

use crate::pixels::{self, PixelError};
pub use report::{contact_sheet, Report, Score};

/// Side of an evaluation crop.
pub const CROP: u32 = 256;
/// At most this many crops per image.
pub const CROPS_PER_IMAGE: usize = 8;

/// The error a method reports; it is wrapped with the method's name.
pub type MethodError = Box<dyn std::error::Error + Send + Sync>;

/// Maps a low-res RGB image to one `scale` times larger.
pub trait Upscaler {
    fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError>;
}

/// Maps a high-res RGB image to its reconstruction (an autoencoder's round trip).
pub trait Reconstructor {
    fn reconstruct(&mut self, high: &RgbImage) -> Result<RgbImage, MethodError>;
}

/// One method under evaluation.
pub enum Method<'a> {
    /// Sees only the low-res crop.
    Upscale(&'a mut dyn Upscaler),
    /// Sees the high-res crop: a ceiling, not an upscaler.
    Reconstruct(&'a mut dyn Reconstructor),
}

/// Bicubic interpolation in pixel space (Catmull-Rom, Keys a = −0.5, as PIL's BICUBIC).
pub struct Bicubic;

impl Upscaler for Bicubic {
    fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError> {
        let (w, h) = low.dimensions();
        Ok(image::imageops::resize(low, w * scale, h * scale, image::imageops::FilterType::CatmullRom))
    }
}

/// One crop: where it came from, the ground truth and its low-res input.
pub struct EvalCrop {
    /// `<file name>#<crop index>`.
    pub source: String,
    pub high: RgbImage,
    pub low: RgbImage,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Pixels(#[from] PixelError),
    #[error("scale {0}: must be ≥ 2 and divide the crop size {CROP}")]
    Scale(u32),
    #[error("no {CROP}×{CROP} crop fits in any image of `{0}`")]
    NoCrops(String),
    #[error("method `{name}` on {source_crop}: {error}")]
    Method { name: String, source_crop: String, error: MethodError },
    #[error("method `{name}` returned a {got:?} image for a {want:?} crop")]
    OutputSize { name: String, got: (u32, u32), want: (u32, u32) },
    #[error("cancelled")]
    Cancelled,
}

/// Builds the crops of every image in `dir` (see the module doc).
pub fn load_crops(dir: &Path, scale: u32) -> Result<Vec<EvalCrop>, EvalError> {
    if scale < 2 || CROP % scale != 0 {
        return Err(EvalError::Scale(scale));
    }
    let mut crops = Vec::new();
    for file in pixels::image_files(dir)? {
        let photo = pixels::load_photo(&file)?;
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for (k, high) in pixels::grid_crops(&photo, CROP, CROPS_PER_IMAGE).into_iter().enumerate() {
            let low = pixels::area_downsample(&high, scale);
            crops.push(EvalCrop { source: format!("{name}#{k}"), high, low });
        }
    }
    if crops.is_empty() {
        return Err(EvalError::NoCrops(dir.display().to_string()));
    }
    Ok(crops)
}

/// The outcome of [`evaluate`]: the scores and, for a contact sheet, every method's output on
/// the first `keep` crops (`outputs[crop][method]`).
pub struct Evaluation {
    pub report: Report,
    pub outputs: Vec<Vec<RgbImage>>,
}

/// Runs every method on every crop and averages PSNR and SSIM. `progress(done, total)` is called
/// after each crop and stops the run by returning `false`.
pub fn evaluate(
    crops: &[EvalCrop],
    scale: u32,
    methods: &mut [(String, Method<'_>)],
    keep: usize,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Evaluation, EvalError> {
    let mut sums = vec![(0.0f64, 0.0f64); methods.len()];
    let mut outputs = Vec::new();
    for (i, crop) in crops.iter().enumerate() {
        let mut row = Vec::new();
        for ((name, method), sum) in methods.iter_mut().zip(sums.iter_mut()) {
            let out = match method {
                Method::Upscale(m) => m.upscale(&crop.low, scale),
                Method::Reconstruct(m) => m.reconstruct(&crop.high),
            }
            .map_err(|error| EvalError::Method { name: name.clone(), source_crop: crop.source.clone(), error })?;
            if out.dimensions() != crop.high.dimensions() {
                return Err(EvalError::OutputSize { name: name.clone(), got: out.dimensions(), want: crop.high.dimensions() });
            }
            sum.0 += metrics::psnr(&out, &crop.high);
            sum.1 += metrics::ssim(&out, &crop.high);
            if i < keep {
                row.push(out);
            }
        }
        if i < keep {
            outputs.push(row);
        }
        if !progress(i + 1, crops.len()) {
            return Err(EvalError::Cancelled);
        }
    }
    let n = crops.len() as f64;
    let scores = methods
        .iter()
        .zip(sums)
        .map(|((name, _), (p, s))| (name.clone(), Score { psnr: p / n, ssim: s / n }))
        .collect();
    Ok(Evaluation { report: Report { scale, crops: crops.len(), methods: scores }, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nearest;
    impl Upscaler for Nearest {
        fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError> {
            let (w, h) = low.dimensions();
            Ok(image::imageops::resize(low, w * scale, h * scale, image::imageops::FilterType::Nearest))
        }
    }
    struct Identity;
    impl Reconstructor for Identity {
        fn reconstruct(&mut self, high: &RgbImage) -> Result<RgbImage, MethodError> {
            Ok(high.clone())
        }
    }
    struct Broken;
    impl Upscaler for Broken {
        fn upscale(&mut self, _: &RgbImage, _: u32) -> Result<RgbImage, MethodError> {
            Err("weights missing".into())
        }
    }

    fn smooth(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let f = |a: f32| (127.5 + 100.0 * a.sin()) as u8;
            image::Rgb([f(x as f32 / 23.0), f(y as f32 / 31.0), f((x + y) as f32 / 41.0)])
        })
    }

    #[test]
    fn bicubic_keeps_flat_images_flat_and_sizes_right() {
        let flat = RgbImage::from_pixel(8, 5, image::Rgb([40, 90, 200]));
        let up = Bicubic.upscale(&flat, 4).unwrap();
        assert_eq!(up.dimensions(), (32, 20));
        assert!(up.pixels().all(|p| p.0 == [40, 90, 200]));
    }

    #[test]
    fn crops_follow_the_protocol_and_bicubic_beats_nearest() {
        let dir = tempfile::tempdir().unwrap();
        // 1100 px short side: halved to 700×550 → 2×2 crops of 256².
        smooth(1400, 1100).save(dir.path().join("a.png")).unwrap();
        // Too small for one crop: contributes none.
        smooth(200, 300).save(dir.path().join("b.png")).unwrap();
        let crops = load_crops(&dir.path(), 4).unwrap();
        assert_eq!(crops.len(), 4);
        assert_eq!(crops[0].low.dimensions(), (64, 64));
        assert_eq!(crops[3].source, "a.png#3");

        let (mut bicubic, mut nearest, mut identity) = (Bicubic, Nearest, Identity);
        let mut methods = vec![
            ("bicubic".to_string(), Method::Upscale(&mut bicubic)),
            ("nearest".to_string(), Method::Upscale(&mut nearest)),
            ("ae_ceiling".to_string(), Method::Reconstruct(&mut identity)),
        ];
        let mut calls = 0;
        let eval = evaluate(&crops, 4, &mut methods, 2, &mut |_, _| {
            calls += 1;
            true
        })
        .unwrap();
        assert_eq!(calls, 4);
        assert_eq!((eval.outputs.len(), eval.outputs[0].len()), (2, 3));
        let m = &eval.report.methods;
        assert_eq!(m[0].0, "bicubic");
        assert!(m[0].1.psnr > m[1].1.psnr && m[0].1.ssim > m[1].1.ssim, "{m:?}");
        assert_eq!(m[2].1.psnr, f64::INFINITY);

        let mut broken = Broken;
        let mut methods = vec![("cfm".to_string(), Method::Upscale(&mut broken))];
        let err = evaluate(&crops, 4, &mut methods, 0, &mut |_, _| true).err().unwrap().to_string();
        assert!(err.contains("cfm") && err.contains("a.png#0") && err.contains("weights missing"), "{err}");

        assert!(matches!(load_crops(&dir.path(), 3), Err(EvalError::Scale(3))));
        let only_small = tempfile::tempdir().unwrap();
        smooth(100, 100).save(only_small.path().join("s.png")).unwrap();
        assert!(matches!(load_crops(only_small.path(), 2), Err(EvalError::NoCrops(_))));
    }
}

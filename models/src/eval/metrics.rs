//! Full-reference image metrics on 8-bit RGB: PSNR and SSIM.

use image::RgbImage;

/// Peak signal-to-noise ratio in dB over all pixels and the three channels, with peak 255.
/// Identical images give `f64::INFINITY`.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "psnr: images differ in size");
    let n = a.as_raw().len() as f64;
    let sse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    if sse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / (sse / n)).log10()
}

/// SSIM window: 11 × 11 taps.
pub const SSIM_WINDOW: usize = 11;
/// SSIM window: Gaussian σ.
pub const SSIM_SIGMA: f64 = 1.5;
const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);

/// The normalised 1-D Gaussian of the SSIM window (the 2-D window is its outer product).
pub fn ssim_taps() -> [f64; SSIM_WINDOW] {
    let half = (SSIM_WINDOW / 2) as f64;
    let mut taps = std::array::from_fn(|i| (-((i as f64 - half).powi(2)) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp());
    let sum: f64 = taps.iter().sum();
    taps.iter_mut().for_each(|t| *t /= sum);
    taps
}

/// Structural similarity (Wang et al. 2004): K1 = 0.01, K2 = 0.03, L = 255, an 11 × 11
/// Gaussian window with σ = 1.5 evaluated where it fits inside the image ("valid", as in the
/// paper's reference MATLAB code), SSIM map averaged per channel, then over R, G and B.
/// Images smaller than the window are an error of the caller (panics).
pub fn ssim(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "ssim: images differ in size");
    let (w, h) = (a.width() as usize, a.height() as usize);
    assert!(w >= SSIM_WINDOW && h >= SSIM_WINDOW, "ssim: images must be at least {SSIM_WINDOW}×{SSIM_WINDOW}");
    let taps = ssim_taps();
    let channel = |img: &RgbImage, c: usize| -> Vec<f64> { img.pixels().map(|p| p[c] as f64).collect() };
    let mut total = 0.0;
    for c in 0..3 {
        let (x, y) = (channel(a, c), channel(b, c));
        let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
        let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
        let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
        let [mx, my, sxx, syy, sxy] = [&x, &y, &xx, &yy, &xy].map(|plane| blur_valid(plane, w, h, &taps));
        let mut sum = 0.0;
        for i in 0..mx.len() {
            let (mux, muy) = (mx[i], my[i]);
            let vx = sxx[i] - mux * mux;
            let vy = syy[i] - muy * muy;
            let cov = sxy[i] - mux * muy;
            sum += ((2.0 * mux * muy + C1) * (2.0 * cov + C2)) / ((mux * mux + muy * muy + C1) * (vx + vy + C2));
        }
        total += sum / mx.len() as f64;
    }
    total / 3.0
}

/// Separable Gaussian filter keeping only positions where the whole window fits.
fn blur_valid(plane: &[f64], w: usize, h: usize, taps: &[f64; SSIM_WINDOW]) -> Vec<f64> {
    let (ow, oh) = (w - SSIM_WINDOW + 1, h - SSIM_WINDOW + 1);
    let mut rows = vec![0.0; ow * h];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = taps.iter().enumerate().map(|(k, t)| t * plane[y * w + x + k]).sum();
        }
    }
    let mut out = vec![0.0; ow * oh];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = taps.iter().enumerate().map(|(k, t)| t * rows[(y + k) * ow + x]).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    #[test]
    fn identical_images_are_perfect() {
        let img = RgbImage::from_fn(16, 13, |x, y| image::Rgb([(x * 13) as u8, (y * 17) as u8, ((x ^ y) * 9) as u8]));
        assert_eq!(psnr(&img, &img), f64::INFINITY);
        assert!((ssim(&img, &img) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_a_constant_offset() {
        // MSE = 10² = 100, PSNR = 10·log10(255² / 100) = 28.1308 dB.
        let got = psnr(&flat(8, 8, 100), &flat(8, 8, 110));
        assert!((got - 28.130803608679106).abs() < 1e-9, "{got}");
        // Half the values off by 20: MSE = 200, PSNR = 25.1205 dB.
        let half = RgbImage::from_fn(8, 8, |x, _| if x < 4 { image::Rgb([120; 3]) } else { image::Rgb([100; 3]) });
        assert!((psnr(&flat(8, 8, 100), &half) - 25.120503652039293).abs() < 1e-9);
    }

    #[test]
    fn ssim_of_two_flat_images_is_the_luminance_term() {
        // σ = 0: SSIM = (2·100·110 + C1) / (100² + 110² + C1) with C1 = 2.55² = 6.5025.
        let expected = (22000.0 + 6.5025) / (22100.0 + 6.5025);
        let got = ssim(&flat(12, 12, 100), &flat(12, 12, 110));
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    #[test]
    fn ssim_of_one_bright_pixel_in_a_single_window() {
        // 11×11 images: one window. a is c everywhere but the centre, c + d; b is flat c.
        // With the centre weight p = g(0)², μa = c + p·d, σa² = p(1 − p)d², σb = σab = 0, so
        // SSIM = (2·μa·c + C1)/(μa² + c² + C1) · C2/(σa² + C2).
        let (c, d) = (60.0f64, 150.0f64);
        let a = RgbImage::from_fn(11, 11, |x, y| {
            if (x, y) == (5, 5) { image::Rgb([(c + d) as u8; 3]) } else { image::Rgb([c as u8; 3]) }
        });
        let p = ssim_taps()[5].powi(2);
        let mu = c + p * d;
        let var = p * (1.0 - p) * d * d;
        let expected = (2.0 * mu * c + C1) / (mu * mu + c * c + C1) * C2 / (var + C2);
        let got = ssim(&a, &flat(11, 11, c as u8));
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // σ = 1.5: g(0) = 1 / Σ exp(−k²/4.5), k = −5..5 ≈ 0.2660; p ≈ 0.0707.
        assert!((p - 0.0707).abs() < 1e-3, "{p}");
    }

    #[test]
    fn ssim_is_symmetric_and_drops_with_noise() {
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8]));
        let noisy = RgbImage::from_fn(32, 32, |x, y| {
            let p = img.get_pixel(x, y).0;
            let n = if (x * 7 + y * 3) % 5 < 2 { 30i32 } else { -30 };
            image::Rgb(p.map(|v| (v as i32 + n).clamp(0, 255) as u8))
        });
        let s = ssim(&img, &noisy);
        assert!(s < 0.9 && s > 0.0, "{s}");
        assert!((s - ssim(&noisy, &img)).abs() < 1e-12);
    }
}

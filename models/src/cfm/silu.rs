//! `SiLU(v·scale + shift)` over a slice, the last step of the fused GroupNorm + SiLU.
//!
//! candle's SiLU calls libm's `expf` once per element, which the compiler cannot vectorise.
//! Here exp is Cephes' `expf` (range reduction by ln 2 in two parts, a degree-6 polynomial,
//! 2ⁿ from the exponent bits; relative error ≈ 1e-7 over the clamped range) written in plain
//! f32 arithmetic, so the loop vectorises; it is compiled for AVX-512 and AVX2+FMA as well as
//! the baseline and the widest one the CPU has is picked at run time.

/// `dst[i] = silu(src[i] · scale + shift)`; `dst` and `src` have the same length.
pub(crate) fn affine_silu(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    assert_eq!(dst.len(), src.len(), "affine_silu: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { affine_silu_avx512(dst, src, scale, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { affine_silu_avx2(dst, src, scale, shift) };
        }
    }
    affine_silu_body(dst, src, scale, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn affine_silu_avx512(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    affine_silu_body(dst, src, scale, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_silu_avx2(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    affine_silu_body(dst, src, scale, shift)
}

#[inline(always)]
fn affine_silu_body(dst: &mut [f32], src: &[f32], scale: f32, shift: f32) {
    for (o, &v) in dst.iter_mut().zip(src) {
        let y = v * scale + shift;
        *o = y / (1.0 + exp(-y));
    }
}

/// Cephes `expf`, branch-free. Inputs are clamped to [−87.3, 88.3]: the result stays finite
/// and positive, so `y / (1 + exp(−y))` is ≈ 0 for very negative y and y for large y.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a rounding
    // instruction the baseline x86-64 target lacks.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let poly = p * r * r + r + 1.0;
    // 2ⁿ with n in [−126, 127]: a normal float built from its exponent bits.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    poly * two_n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp(-200.0) >= 0.0 && exp(-200.0) < 1e-37);
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn affine_silu_matches_the_definition() {
        let src: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let mut dst = vec![0f32; src.len()];
        affine_silu(&mut dst, &src, 0.7, -1.5);
        for (&o, &v) in dst.iter().zip(&src) {
            let y = (v * 0.7 - 1.5) as f64;
            let expect = y / (1.0 + (-y).exp());
            assert!((o as f64 - expect).abs() <= 1e-6 * expect.abs().max(1.0), "silu({y}) = {o}, expected {expect}");
        }
        // Also the baseline path, whatever the CPU.
        affine_silu_body(&mut dst, &src, 0.7, -1.5);
        let y = (src[0] * 0.7 - 1.5) as f64;
        assert!((dst[0] as f64 - y / (1.0 + (-y).exp())).abs() < 1e-6);
    }
}

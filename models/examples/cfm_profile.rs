//! Where the CPU time of one CFM UNet evaluation goes: times candle's conv2d and GroupNorm
//! against ours at the shapes the paper config runs at, then the whole network.
//!
//! `cargo run -p fmboost-models --example cfm_profile -- [LATENT]` (default 128).

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use fmboost_models::cfm::{conv3x3, group_norm, EfficientUNet, UNetConfig};

fn time<T>(label: &str, reps: usize, mut f: impl FnMut() -> candle_core::Result<T>) -> candle_core::Result<f64> {
    f()?; // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{label:<52} {ms:>9.2} ms");
    Ok(ms)
}

fn main() -> candle_core::Result<()> {
    let latent: usize = std::env::args().nth(1).map(|s| s.parse().expect("LATENT must be a number")).unwrap_or(128);
    let dev = Device::Cpu;
    println!("threads: {}", candle_core::utils::get_num_threads());
    // The GEMM ceiling on this machine, for scale.
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &dev)?;
    let ms = time("candle matmul 1024³", 3, || a.matmul(&a))?;
    println!("{:<52} {:>9.1} GFLOP/s", "", 2.0 * 1024f64.powi(3) / 1e9 / ms * 1e3);
    for (level, ch) in [128usize, 256, 512, 1024].into_iter().enumerate() {
        let side = latent >> level;
        let x = Tensor::randn(0f32, 1.0, (1, ch, side, side), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (ch, ch, 3, 3), &dev)?;
        let b = Tensor::zeros(ch, DType::F32, &dev)?;
        let gflop = 2.0 * (ch * ch * 9 * side * side) as f64 / 1e9;
        let ms = time(&format!("candle conv2d 3x3 {ch}→{ch} @ {side}²"), 2, || {
            x.conv2d(&w, 1, 1, 1, 1)?.broadcast_add(&b.reshape((1, ch, 1, 1))?)
        })?;
        println!("{:<52} {:>9.1} GFLOP/s", "", gflop / ms * 1e3);
        let ms = time(&format!("shifted-GEMM conv3x3 {ch}→{ch} @ {side}²"), 2, || conv3x3(&x, &w, &b))?;
        println!("{:<52} {:>9.1} GFLOP/s", "", gflop / ms * 1e3);
        let ones = Tensor::ones(ch, DType::F32, &dev)?;
        let gn = candle_nn::GroupNorm::new(ones.clone(), b.clone(), ch, 32, 1e-5)?;
        time(&format!("candle_nn GroupNorm {ch} @ {side}²"), 3, || gn.forward(&x))?;
        time(&format!("fused group_norm {ch} @ {side}²"), 3, || group_norm(&x, &ones, &b, 32, 1e-5))?;
        time(&format!("silu {ch} @ {side}²"), 3, || x.silu())?;
        time(&format!("cat skip {ch}+{ch} @ {side}²"), 3, || Tensor::cat(&[&x, &x], 1))?;
    }

    let config = UNetConfig::paper();
    let unet = EfficientUNet::random(&config, &dev, DType::F32)?;
    let x = Tensor::randn(0f32, 1.0, (1, 4, latent, latent), &dev)?;
    let t = Tensor::new(&[0.5f32], &dev)?;
    time("paper UNet forward", 2, || unet.forward(&x, &t, Some(&x)))?;
    Ok(())
}

//! `fmboost bench cfm`: one forward of the CFM UNet (random weights) at a given latent size,
//! timed after a warm-up. Prints one JSON line: parameters, FLOPs per evaluation (counted from
//! the config), median seconds per evaluation, achieved GFLOP/s and peak RSS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use fmboost_models::cfm::{flops_per_forward, parameter_count, EfficientUNet, UNetConfig};
use fmboost_models::device::{parse_device, parse_dtype};

#[derive(clap::Args)]
pub struct Args {
    /// `paper` (the paper's 306 M-parameter SD upsampler) or a JSON file holding a UNet config.
    #[arg(long, default_value = "paper")]
    config: String,
    /// Side of the (square) latent the network runs on: the hop's output size.
    #[arg(long, default_value_t = 128)]
    latent: usize,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed network evaluations; the reported time is their median.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed evaluations before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

fn load_config(spec: &str) -> anyhow::Result<UNetConfig> {
    if spec == "paper" {
        return Ok(UNetConfig::paper());
    }
    let path = PathBuf::from(spec);
    let json = std::fs::read_to_string(&path).with_context(|| format!("--config {spec}: not `paper` and not a readable file"))?;
    UNetConfig::from_json(&json).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config)?;
    let device = parse_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let dtype = parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if device.is_cpu() && matches!(dtype, DType::F16 | DType::BF16) {
        bail!("--dtype {}: half precision runs only on CUDA (candle's CPU convolutions have no half kernels)", args.dtype);
    }
    if args.steps == 0 {
        bail!("--steps: must be > 0");
    }
    if args.batch == 0 {
        bail!("--batch: must be > 0");
    }
    let multiple = 1usize << config.downsamplings();
    if args.latent == 0 || !args.latent.is_multiple_of(multiple) {
        bail!("--latent {}: must be a positive multiple of {multiple} for this config", args.latent);
    }
    if config.in_channels < config.out_channels {
        bail!("--config: in_channels {} < out_channels {}: no room for x_t", config.in_channels, config.out_channels);
    }

    let params = parameter_count(&config)?;
    let unet = EfficientUNet::random(&config, &device, dtype).context("building the UNet")?;
    let side = args.latent;
    // x_t has out_channels channels, the context the rest of in_channels.
    let x = Tensor::randn(0f32, 1.0, (args.batch, config.out_channels, side, side), &device)?.to_dtype(dtype)?;
    let context_channels = config.in_channels - config.out_channels;
    let context = if context_channels > 0 {
        Some(Tensor::randn(0f32, 1.0, (args.batch, context_channels, side, side), &device)?.to_dtype(dtype)?)
    } else {
        None
    };
    let t = Tensor::full(0.5f32, args.batch, &device)?;

    // (wall seconds, CPU seconds of all threads) of one evaluation.
    let evaluate = || -> anyhow::Result<(f64, f64)> {
        let cpu_start = super::process_cpu_seconds()?;
        let start = Instant::now();
        let v = unet.forward(&x, &t, context.as_ref())?;
        device.synchronize()?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu_seconds = super::process_cpu_seconds()? - cpu_start;
        // Touch the result so nothing is skipped, and catch NaNs from broken kernels.
        let sum = v.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite() {
            bail!("the forward produced non-finite values");
        }
        Ok((seconds, cpu_seconds))
    };
    for _ in 0..args.warmup {
        evaluate()?;
    }
    let runs = (0..args.steps).map(|_| evaluate()).collect::<anyhow::Result<Vec<(f64, f64)>>>()?;
    let mut times: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let mut cpu_times: Vec<f64> = runs.iter().map(|r| r.1).collect();
    times.sort_by(f64::total_cmp);
    cpu_times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = flops_per_forward(&config, args.batch, side, side);
    let line = serde_json::json!({
        "bench": "cfm",
        "config": args.config,
        "latent": side,
        "batch": args.batch,
        "device": args.device,
        "dtype": args.dtype,
        "threads": candle_core::utils::get_num_threads(),
        "params": params,
        "flops_per_nfe": flops,
        "seconds_per_nfe": median,
        "seconds_min": times[0],
        "seconds_max": times[times.len() - 1],
        "timed_nfe": args.steps,
        "warmup": args.warmup,
        "gflops_per_s": flops as f64 / median / 1e9,
        "cpu_seconds_per_nfe": cpu_times[cpu_times.len() / 2],
        "load_avg_1m": super::load_average_1m()?,
        "peak_rss_bytes": super::peak_rss_bytes()?,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

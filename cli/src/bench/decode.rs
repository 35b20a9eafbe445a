//! `fmboost bench decode`: the SD 1.5 VAE (its architecture, random weights) decoding a square
//! latent, tiled and — where the estimate says it fits in memory — untiled. Prints one JSON line
//! with seconds and peak RSS (`VmHWM`) after each run.
//!
//! Peak RSS is a process-wide high-water mark, so the tiled run goes first: its figure is not
//! inflated by the untiled one.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use fmboost_models::autoencoder::{Autoencoder, AutoencoderConfig, TileConfig};
use fmboost_models::device::{parse_device, parse_dtype};
use fmboost_models::progress;
use fmboost_models::rng::{rng_for, Stream};

use super::peak_rss_bytes;

#[derive(clap::Args)]
pub struct Args {
    /// Side of the (square) latent; the image is 8× that (256 → 2048² px).
    #[arg(long, default_value_t = 256)]
    latent: usize,
    /// Tile side in latent pixels.
    #[arg(long, default_value_t = TileConfig::default().tile)]
    tile: usize,
    /// Overlap of neighbouring tiles in latent pixels.
    #[arg(long, default_value_t = TileConfig::default().overlap)]
    overlap: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32`, `f16` or `bf16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Memory the untiled decode may use, in GiB; it is skipped when its estimate exceeds this.
    /// Default: MemAvailable on the CPU; on CUDA the untiled run needs this flag.
    #[arg(long)]
    untiled_limit_gib: Option<f64>,
}

/// A conservative estimate of the untiled decode's peak in bytes: the mid-block attention's
/// scores and probabilities (L² × L² each) or, at full resolution, three 256-channel feature
/// maps plus a 128-channel one, whichever is larger; plus the weights.
fn untiled_estimate_bytes(config: &AutoencoderConfig, latent: usize, elem: usize) -> u64 {
    let positions = (latent * latent) as u64;
    let attention = 2 * positions * positions * elem as u64;
    let side = (latent * config.downscale()) as u64;
    let widest_full_res = config.block_out_channels.get(1).copied().unwrap_or(config.block_out_channels[0]) as u64;
    let features = side * side * (3 * widest_full_res + config.block_out_channels[0] as u64) * elem as u64;
    attention.max(features) + 400 * (1 << 20)
}

fn mem_available_bytes() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:")).context("no MemAvailable in /proc/meminfo")?;
    let kib: u64 = line.trim_start_matches("MemAvailable:").trim().trim_end_matches("kB").trim().parse()?;
    Ok(kib * 1024)
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = parse_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let dtype = parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if args.latent == 0 {
        bail!("--latent: must be > 0");
    }
    let tiles = TileConfig { tile: args.tile, overlap: args.overlap, auto_above: 0 };
    tiles.validate().map_err(|e| anyhow::anyhow!("--tile/--overlap: {e}"))?;

    let config = AutoencoderConfig::sd15();
    let vae = Autoencoder::random(&config, dtype, &device).context("building the SD 1.5 VAE")?;
    let side = args.latent;
    let z = rng_for(0, Stream::Base).randn(&[1, config.latent_channels, side, side], &device)?.to_dtype(dtype)?;
    let rss_before = peak_rss_bytes()?;

    let start = Instant::now();
    // Per-tile progress on stderr, so a run stopped by a time limit still tells how far it got.
    let mut report = |step: progress::Step| {
        let rss = peak_rss_bytes().map(|b| format!("{:.2} GiB", b as f64 / GIB)).unwrap_or_else(|e| e.to_string());
        eprintln!("tile pass step {}/{} at {:.1} s, peak RSS so far {rss}", step.step, step.total, start.elapsed().as_secs_f64());
        progress::Flow::Continue
    };
    let image = vae.decode_tiled(&z, &tiles, &mut report).map_err(|e| anyhow::anyhow!("tiled decode: {e}"))?;
    device.synchronize()?;
    let tiled_seconds = start.elapsed().as_secs_f64();
    check_image(&image, side * config.downscale())?;
    drop(image);
    let tiled_rss = peak_rss_bytes()?;
    let tile_count = tiles.origins(side).len().pow(2);

    let elem = dtype.size_in_bytes();
    let estimate = untiled_estimate_bytes(&config, side, elem);
    let limit = match (args.untiled_limit_gib, &device) {
        (Some(gib), _) => Some((gib * GIB) as u64),
        (None, Device::Cpu) => Some(mem_available_bytes()?),
        (None, _) => None,
    };
    let untiled = match limit {
        Some(limit) if estimate <= limit => {
            let start = Instant::now();
            let image = decode_untiled(&vae, &z)?;
            device.synchronize()?;
            let seconds = start.elapsed().as_secs_f64();
            check_image(&image, side * config.downscale())?;
            serde_json::json!({"ran": true, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()?})
        }
        Some(limit) => serde_json::json!({
            "ran": false,
            "reason": format!("estimated {:.1} GiB exceeds the {:.1} GiB available", estimate as f64 / GIB, limit as f64 / GIB),
        }),
        None => serde_json::json!({"ran": false, "reason": "on CUDA the untiled run needs --untiled-limit-gib"}),
    };

    let line = serde_json::json!({
        "bench": "decode",
        "model": "sd15-vae (random weights)",
        "device": args.device,
        "dtype": args.dtype,
        "latent": side,
        "image_px": side * config.downscale(),
        "peak_rss_before_decode_bytes": rss_before,
        "tiled": {
            "tile": tiles.tile,
            "overlap": tiles.overlap,
            "tiles": tile_count,
            "seconds": tiled_seconds,
            "peak_rss_bytes": tiled_rss,
            "peak_rss_gib": tiled_rss as f64 / GIB,
        },
        "untiled": untiled,
        "untiled_estimate_bytes": estimate,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// One pass over the whole latent (never tiled, whatever its size).
fn decode_untiled(vae: &Autoencoder, z: &Tensor) -> anyhow::Result<Tensor> {
    let unscaled = (z / vae.config().scaling_factor)?;
    Ok(vae.decode_unscaled(&unscaled)?)
}

/// The decode produced a finite image of the expected size.
fn check_image(image: &Tensor, px: usize) -> anyhow::Result<()> {
    let dims = image.dims();
    if dims != [1, 3, px, px] {
        bail!("decoded image has shape {dims:?}, expected [1, 3, {px}, {px}]");
    }
    let sum = image.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        bail!("decoded image is not finite");
    }
    Ok(())
}

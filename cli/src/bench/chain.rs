//! `fmboost bench chain`: the whole text-to-image chain a user runs, on SD 1.5's architectures
//! with random weights: CLIP text encoder (prompt and the empty negative prompt), the UNet at a
//! 64² latent with classifier-free guidance for 25 DDIM steps and, separately, 4 LCM steps
//! (guidance 1, the LCM-LoRA recipe: one UNet evaluation a step), the paper-config CFM hop
//! 64²→128² (→256² for `--px 2048`) with 40 Euler NFE, and the VAE decode (untiled at 1024²,
//! tiled at 2048²). Prints one JSON line: seconds per stage, seconds per image, peak RSS.
//! `scripts/bench/torch_chain_bench.py` prints the same fields for PyTorch/diffusers.
//!
//! Token ids are fixed (start token, 8 word ids, end-token padding): no tokenizer file is
//! needed, and tokenizing takes microseconds next to the networks.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use fmboost_models::autoencoder::{Autoencoder, AutoencoderConfig, TileConfig};
use fmboost_models::base::{denoise, Scheduler, SchedulerConfig, SchedulerKind, SeededNoise, UNetConfig};
use fmboost_models::cfm::{self, EfficientUNet, HopConfig, Solver, UpsampleMode};
use fmboost_models::device::{parse_device, parse_dtype};
use fmboost_models::init::seeded_tensors;
use fmboost_models::progress;
use fmboost_models::rng::{rng_for, Stream};
use serde_json::{json, Value};

/// SD 1.5's `unet/config.json` (the fields that shape the network).
const SD15_UNET: &str = r#"{"block_out_channels":[320,640,1280,1280],"cross_attention_dim":768,"attention_head_dim":8,
"layers_per_block":2,"in_channels":4,"out_channels":4,
"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
"up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#;

/// SD 1.5's CLIP ViT-L/14 text encoder.
fn sd15_clip() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        embed_dim: 768,
        activation: Activation::QuickGelu,
        intermediate_size: 3072,
        max_position_embeddings: 77,
        pad_with: None,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        projection_dim: 768,
    }
}

const START_TOKEN: u32 = 49406;
const END_TOKEN: u32 = 49407;
/// SD 1.5's latent side for 512² px.
const BASE_LATENT: usize = 64;

/// The stages `--stages` may name, in the order they run.
const STAGES: [&str; 5] = ["text", "ddim", "lcm", "cfm", "decode"];

#[derive(clap::Args)]
pub struct Args {
    /// Output size in pixels: 1024 (one CFM hop 64²→128², untiled decode) or 2048 (two hops
    /// to 256², tiled decode).
    #[arg(long, default_value_t = 1024)]
    px: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32` or `bf16` (bf16 on CUDA only).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Comma-separated stages to run, of text, ddim, lcm, cfm, decode (all by default; for
    /// development). The per-image totals need text, ddim (or lcm), cfm and decode.
    #[arg(long, default_value = "text,ddim,lcm,cfm,decode", value_delimiter = ',')]
    stages: Vec<String>,
    /// DDIM steps (each two UNet evaluations: classifier-free guidance).
    #[arg(long, default_value_t = 25)]
    ddim_steps: usize,
    /// LCM steps (one UNet evaluation each).
    #[arg(long, default_value_t = 4)]
    lcm_steps: usize,
    /// Euler steps (= NFE) of each CFM hop; the paper's 40 by default.
    #[arg(long, default_value_t = 40)]
    cfm_steps: usize,
    /// Classifier-free guidance scale of the DDIM run.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
}

/// Seconds of `f`, synchronising the device before stopping the clock.
fn timed<T>(device: &Device, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

/// A finite result, or a named error (broken kernels show up as NaN).
fn check_finite(t: &Tensor, what: &str) -> anyhow::Result<()> {
    let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        bail!("{what} produced non-finite values");
    }
    Ok(())
}

fn validate(args: &Args) -> anyhow::Result<Vec<&'static str>> {
    if args.px != 1024 && args.px != 2048 {
        bail!("--px {}: must be 1024 or 2048", args.px);
    }
    let mut stages = Vec::new();
    for name in &args.stages {
        match STAGES.iter().find(|s| **s == name.trim()) {
            Some(s) if !stages.contains(s) => stages.push(*s),
            Some(_) => bail!("--stages: `{name}` given twice"),
            None => bail!("--stages: unknown stage `{name}` (expected some of {})", STAGES.join(", ")),
        }
    }
    if stages.is_empty() {
        bail!("--stages: empty");
    }
    stages.sort_by_key(|s| STAGES.iter().position(|x| x == s));
    for (flag, value) in [("--ddim-steps", args.ddim_steps), ("--lcm-steps", args.lcm_steps), ("--cfm-steps", args.cfm_steps)] {
        if value == 0 {
            bail!("{flag}: must be > 0");
        }
    }
    if !(args.guidance.is_finite() && args.guidance > 1.0) {
        bail!("--guidance {}: must be a finite number > 1 (the DDIM run measures classifier-free guidance)", args.guidance);
    }
    Ok(stages)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stages = validate(&args)?;
    let device = parse_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let dtype = parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    match dtype {
        DType::F32 => {}
        DType::BF16 if !device.is_cpu() => {}
        DType::BF16 => bail!("--dtype bf16: half precision runs only on CUDA (candle's CPU convolutions have no half kernels)"),
        _ => bail!("--dtype {}: expected f32 or bf16", args.dtype),
    }
    let hops = if args.px == 2048 { 2 } else { 1 };
    let wants = |s: &str| stages.contains(&s);
    let cpu_start = super::process_cpu_seconds()?;
    let mut out = serde_json::Map::new();
    let mut seconds = serde_json::Map::new();

    // Conditioning [uncond; cond] (B = 2). Without the text stage the UNet gets zeros.
    let context = if wants("text") {
        let encoder = random_text_encoder(dtype, &device).context("building the CLIP text encoder")?;
        let mut prompt = vec![START_TOKEN, 320, 1125, 539, 320, 2368, 530, 518, 3272, END_TOKEN];
        prompt.resize(77, END_TOKEN);
        let mut negative = vec![START_TOKEN, END_TOKEN];
        negative.resize(77, END_TOKEN);
        let ids = Tensor::from_vec([negative, prompt].concat(), (2, 77), &device)?;
        let (hidden, s) = timed(&device, || Ok(encoder.forward_with_mask(&ids, usize::MAX)?))?;
        check_finite(&hidden, "the text encoder")?;
        seconds.insert("text".into(), json!(s));
        hidden
    } else {
        Tensor::zeros((2, 77, 768), dtype, &device)?
    };

    let base_latent = if wants("ddim") || wants("lcm") {
        let unet = random_sd_unet(dtype, &device).context("building the SD 1.5 UNet")?;
        let mut last = None;
        if wants("ddim") {
            let (latent, s) = timed(&device, || base_run(&unet, SchedulerKind::Ddim, args.ddim_steps, Some(args.guidance), &context, dtype, &device))?;
            check_finite(&latent, "the DDIM run")?;
            seconds.insert("ddim".into(), json!(s));
            out.insert("ddim".into(), json!({"steps": args.ddim_steps, "unet_evals": 2 * args.ddim_steps, "guidance": args.guidance, "seconds_per_step": s / args.ddim_steps as f64}));
            last = Some(latent);
        }
        if wants("lcm") {
            let (latent, s) = timed(&device, || base_run(&unet, SchedulerKind::Lcm, args.lcm_steps, None, &context, dtype, &device))?;
            check_finite(&latent, "the LCM run")?;
            seconds.insert("lcm".into(), json!(s));
            out.insert("lcm".into(), json!({"steps": args.lcm_steps, "unet_evals": args.lcm_steps, "guidance": 1.0, "seconds_per_step": s / args.lcm_steps as f64}));
            last = last.or(Some(latent));
        }
        last.expect("one of ddim, lcm ran").to_dtype(DType::F32)?
    } else {
        rng_for(0, Stream::Base).randn(&[1, 4, BASE_LATENT, BASE_LATENT], &device)?
    };

    let top_latent = if wants("cfm") {
        let net = cfm::UNetConfig::paper();
        let unet = EfficientUNet::random(&net, &device, dtype).context("building the paper-config CFM UNet")?;
        let hop = HopConfig { upsample: UpsampleMode::Bilinear, solver: Solver::Euler, steps: args.cfm_steps, noising_step: 400, factor: 2 };
        let mut z = base_latent;
        let mut per_hop = Vec::new();
        let mut total = 0.0;
        for index in 0..hops {
            let (_, _, h, w) = z.dims4()?;
            let eps = cfm::hop_noise(&[0], index as u32, &[1, 4, 2 * h, 2 * w], &device)?;
            let (sample, s) = timed(&device, || Ok(cfm::sample_hop(&unet, &hop, &z, &eps, None, &mut progress::ignore)?))?;
            check_finite(&sample.latent, "the CFM hop")?;
            per_hop.push(json!({"from": h, "to": 2 * h, "nfe": sample.nfe, "seconds": s, "seconds_per_nfe": s / sample.nfe as f64}));
            total += s;
            z = sample.latent;
        }
        seconds.insert("cfm".into(), json!(total));
        out.insert("cfm".into(), json!({"config": "paper", "solver": "euler", "hops": per_hop}));
        z
    } else {
        let side = BASE_LATENT << hops;
        rng_for(0, Stream::Base).randn(&[1, 4, side, side], &device)?
    };

    if wants("decode") {
        let config = AutoencoderConfig::sd15();
        let vae = Autoencoder::random(&config, dtype, &device).context("building the SD 1.5 VAE")?;
        let z = top_latent.to_dtype(dtype)?;
        let tiled = args.px == 2048;
        let (image, s) = timed(&device, || {
            Ok(if tiled {
                vae.decode_tiled(&z, &TileConfig::default(), &mut progress::ignore).map_err(|e| anyhow::anyhow!("tiled decode: {e}"))?
            } else {
                vae.decode_unscaled(&(&z / config.scaling_factor)?)?
            })
        })?;
        check_finite(&image, "the VAE decode")?;
        if image.dims() != [1, 3, args.px, args.px] {
            bail!("decoded image has shape {:?}, expected [1, 3, {}, {}]", image.dims(), args.px, args.px);
        }
        seconds.insert("decode".into(), json!(s));
        let tiles = TileConfig::default();
        out.insert("decode".into(), json!({"tiled": tiled, "tile": tiled.then_some(tiles.tile), "overlap": tiled.then_some(tiles.overlap)}));
    }

    let sum = |base: &str| -> Value {
        ["text", base, "cfm", "decode"]
            .iter()
            .map(|s| seconds.get(*s).and_then(Value::as_f64))
            .sum::<Option<f64>>()
            .map_or(Value::Null, |s| json!(s))
    };
    let (per_image, per_image_lcm) = (sum("ddim"), sum("lcm"));
    let mut line = serde_json::Map::new();
    line.insert("bench".into(), json!("chain"));
    line.insert("impl".into(), json!("fmboost"));
    line.insert("px".into(), json!(args.px));
    line.insert("base_latent".into(), json!(BASE_LATENT));
    line.insert("device".into(), json!(args.device));
    line.insert("dtype".into(), json!(args.dtype));
    line.insert("threads".into(), json!(candle_core::utils::get_num_threads()));
    line.insert("stages".into(), json!(stages));
    line.insert("seconds".into(), Value::Object(seconds));
    line.insert("seconds_per_image".into(), per_image);
    line.insert("seconds_per_image_lcm".into(), per_image_lcm);
    line.extend(out);
    line.insert("cpu_seconds".into(), json!(super::process_cpu_seconds()? - cpu_start));
    line.insert("load_avg_1m".into(), json!(super::load_average_1m()?));
    line.insert("peak_rss_bytes".into(), json!(super::peak_rss_bytes()?));
    println!("{}", Value::Object(line));
    Ok(ExitCode::SUCCESS)
}

/// One text-to-latent run at 64² from seeded noise: `guidance` Some → classifier-free guidance
/// (UNet batch 2 on `context` = [uncond; cond]), None → the conditional half only.
fn base_run(
    unet: &UNet2DConditionModel,
    kind: SchedulerKind,
    steps: usize,
    guidance: Option<f64>,
    context: &Tensor,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let scheduler = Scheduler::new(kind, &SchedulerConfig::default(), steps).map_err(|e| anyhow::anyhow!("{kind:?} scheduler: {e}"))?;
    let mut noise = SeededNoise::new(&[0], Stream::Base);
    let latents = (fmboost_models::base::NoiseSource::next(&mut noise, &[1, 4, BASE_LATENT, BASE_LATENT], device)?.to_dtype(dtype)?
        * scheduler.init_noise_sigma())?;
    let (uncond, cond) = (context.narrow(0, 0, 1)?, context.narrow(0, 1, 1)?);
    let uncond = guidance.map(|_| uncond);
    Ok(denoise(unet, latents, &cond, uncond.as_ref(), guidance.unwrap_or(1.0), &scheduler, &mut noise, &mut progress::ignore)?)
}

/// SD 1.5's UNet with seeded random weights (candle's initialisers), as plain tensors.
fn random_sd_unet(dtype: DType, device: &Device) -> anyhow::Result<UNet2DConditionModel> {
    let config: UNetConfig = serde_json::from_str(SD15_UNET)?;
    let candle_config = config.to_candle().map_err(anyhow::Error::msg)?;
    let build = |vb: VarBuilder| UNet2DConditionModel::new(vb, 4, 4, false, candle_config.clone());
    let weights = seeded_tensors(0, dtype, device, build)?;
    Ok(build(VarBuilder::from_tensors(weights, dtype, device))?)
}

fn random_text_encoder(dtype: DType, device: &Device) -> anyhow::Result<ClipTextTransformer> {
    let config = sd15_clip();
    let build = |vb: VarBuilder| ClipTextTransformer::new(vb.pp("text_model"), &config);
    let weights = seeded_tensors(0, dtype, device, build)?;
    Ok(build(VarBuilder::from_tensors(weights, dtype, device))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("chain").chain(argv.iter().copied())).unwrap().args
    }

    #[test]
    fn bad_flags_are_named() {
        let err = |argv: &[&str]| validate(&parse(argv)).unwrap_err().to_string();
        assert!(err(&["--px", "512"]).contains("--px 512"));
        assert!(err(&["--stages", "text,unet"]).contains("unknown stage `unet`"));
        assert!(err(&["--stages", "cfm,cfm"]).contains("given twice"));
        assert!(err(&["--cfm-steps", "0"]).contains("--cfm-steps"));
        assert!(err(&["--guidance", "1"]).contains("--guidance"));
    }

    #[test]
    fn stages_run_in_chain_order() {
        assert_eq!(validate(&parse(&["--stages", "decode,text"])).unwrap(), vec!["text", "decode"]);
        assert_eq!(validate(&parse(&[])).unwrap(), STAGES.to_vec());
    }
}

//! `fmboost train autoencoder|cfm|base`: the trainer on a folder of photos.
//!
//! Every run writes to `--out DIR`: `checkpoint.safetensors` (resumable with `--resume`),
//! `loss.jsonl` (one line per step), and at the end the exported model: `vae/` (a diffusers
//! folder) for the autoencoder, `unet.safetensors` (EMA weights, config in the metadata) for a
//! CFM hop or the base generator, with its config as `unet.json` (the profile TOML's `config`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use clap::{Args as ClapArgs, Subcommand};
use fmboost_models::autoencoder::{Autoencoder, AutoencoderConfig};
use fmboost_models::cfm::{alpha_bar_cosine, upsample, EfficientUNet, UNetConfig, UpsampleMode, DIFFUSION_STEPS};
use fmboost_models::progress::Flow;
use fmboost_models::rng::{rng_for, Stream};
use fmboost_models::train::checkpoint::{self, META_CONFIG, META_KIND};
use fmboost_models::train::export::{export_autoencoder, export_unet};
use fmboost_models::train::{
    seeded_var_builder,
    latent_scale, named_vars, presets, AdamConfig, AutoencoderObjective, BaseObjective, CfmHopObjective, EmaConfig, LatentSet,
    LossLog, Objective, PhotoSet, TrainConfig, TrainError, Trainer, Zoom, AUTOENCODER_LAYOUT, UNET_LAYOUT,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    model: Model,
}

#[derive(Subcommand)]
enum Model {
    /// The first-stage autoencoder (f = 8): L1 + small KL on random photo crops.
    Autoencoder(AutoencoderArgs),
    /// One CFM hop on precomputed latents, the paper's objective.
    Cfm(CfmArgs),
    /// The unconditional base latent generator: flow matching from N(0, I), no context.
    Base(BaseArgs),
}

#[derive(ClapArgs)]
struct RunArgs {
    /// Folder of training photos (PNG/JPEG).
    #[arg(long, default_value = "data/photos/train")]
    data: PathBuf,
    /// Output folder (checkpoint, loss log, exported model).
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps in total (a resumed run counts the steps already done).
    #[arg(long)]
    steps: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate (Adam).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Linear warm-up steps from 0 to --lr.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Linear decay of the rate from --lr to 0 over the last this many of --steps (0: constant
    /// after the warm-up). The steps before the decay are those of a run without it, so a
    /// constant-rate run can be resumed into its cool-down.
    #[arg(long, default_value_t = 0)]
    cooldown: u64,
    /// Global gradient-norm clipping; 0 disables it.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Continue from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Write the checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
}

#[derive(ClapArgs)]
struct AutoencoderArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Architecture (diffusers `AutoencoderKL` config JSON); default: the tiny preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Side of the training crops in pixels (a multiple of 8).
    #[arg(long, default_value_t = 64)]
    crop: u32,
    /// Crops cover up to this many times their side of the photo (then are resized).
    #[arg(long, default_value_t = 8.0)]
    zoom_max: f32,
    /// KL weight, relative to the summed pixel loss (LDM's 1e-6).
    #[arg(long, default_value_t = 1e-6)]
    kl_weight: f64,
    /// Batches used to measure the latent scale at the end.
    #[arg(long, default_value_t = 16)]
    scale_batches: usize,
}

#[derive(ClapArgs)]
struct LatentArgs {
    /// The trained autoencoder (a diffusers `vae/` folder, e.g. OUT/vae of `train autoencoder`).
    #[arg(long)]
    autoencoder: PathBuf,
    /// UNet architecture (JSON, the reference's keys); default: the tiny preset.
    #[arg(long)]
    unet_config: Option<PathBuf>,
    /// Crops to encode once, before training (cached in OUT/latents.safetensors).
    #[arg(long, default_value_t = 2000)]
    latents: usize,
    /// The EMA copies the weights for this many steps before averaging (the paper: 1000).
    #[arg(long, default_value_t = 1000)]
    ema_after: u64,
}

#[derive(ClapArgs)]
struct CfmArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    latent: LatentArgs,
    /// Side of the high-res training crops in pixels (the latent is side/8).
    #[arg(long, default_value_t = 128)]
    size: u32,
    /// Spatial factor of the hop.
    #[arg(long, default_value_t = 2)]
    factor: u32,
    /// How z_up is made from the low-res latent: `bilinear` or `nearest`.
    #[arg(long, default_value = "bilinear")]
    upsample: String,
    /// Noise-augmentation step in the cosine ᾱ table (the paper: 400).
    #[arg(long, default_value_t = 400)]
    noising_step: usize,
    /// Crops cover up to this many times their side of the photo.
    #[arg(long, default_value_t = 8.0)]
    zoom_max: f32,
}

#[derive(ClapArgs)]
struct BaseArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    latent: LatentArgs,
    /// Side of the generated images in pixels (the latent is side/8).
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Crops cover at least this many times their side of the photo (whole scenes).
    #[arg(long, default_value_t = 6.0)]
    zoom_min: f32,
    #[arg(long, default_value_t = 64.0)]
    zoom_max: f32,
}

pub fn run(args: Args) -> Result<()> {
    match args.model {
        Model::Autoencoder(a) => train_autoencoder(a),
        Model::Cfm(a) => train_cfm(a),
        Model::Base(a) => train_base(a),
    }
}

struct Run {
    device: Device,
    checkpoint: PathBuf,
    photos: PhotoSet,
}

impl RunArgs {
    fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("--steps must be > 0");
        }
        if self.batch == 0 {
            bail!("--batch must be > 0");
        }
        if !(self.grad_clip >= 0.0) {
            bail!("--grad-clip {} must be ≥ 0", self.grad_clip);
        }
        if self.cooldown > self.steps {
            bail!("--cooldown {} must be ≤ --steps {}", self.cooldown, self.steps);
        }
        Ok(())
    }

    fn prepare(&self) -> Result<Run> {
        self.validate()?;
        let device = fmboost_models::device::parse_device(&self.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
        let checkpoint = self.out.join("checkpoint.safetensors");
        if checkpoint.exists() && !self.resume {
            bail!("{} exists: pass --resume to continue it, or choose another --out", checkpoint.display());
        }
        if self.resume && !checkpoint.exists() {
            bail!("--resume: {} does not exist", checkpoint.display());
        }
        std::fs::create_dir_all(&self.out).with_context(|| format!("--out {}", self.out.display()))?;
        let photos = PhotoSet::load(&self.data).with_context(|| format!("--data {}", self.data.display()))?;
        eprintln!("{} training photos from {}", photos.images.len(), self.data.display());
        Ok(Run { device, checkpoint, photos })
    }

    fn config(&self, ema: Option<EmaConfig>) -> TrainConfig {
        TrainConfig {
            steps: self.steps,
            lr: self.lr,
            warmup_steps: self.warmup,
            cooldown_steps: self.cooldown,
            adam: AdamConfig::default(),
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            ema,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
        }
    }
}

/// Runs the loop with a progress bar and the loss log; resumes first when asked.
fn fit(trainer: &mut Trainer, objective: &mut dyn Objective, args: &RunArgs, run: &Run) -> Result<()> {
    if args.resume {
        let ckpt = checkpoint::read(&run.checkpoint, &Device::Cpu)?;
        trainer.resume(&ckpt)?;
        eprintln!("resumed at step {}", trainer.step());
    }
    let mut log = LossLog::open(&args.out.join("loss.jsonl"), args.resume.then_some(trainer.step())).context("loss log")?;
    let bar = ProgressBar::new(args.steps).with_position(trainer.step());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  loss {msg}  {elapsed_precise} ETA {eta_precise}")
            .expect("static template"),
    );
    let mut smoothed: Option<f64> = None;
    let result = trainer.fit(objective, Some(&run.checkpoint), Some(&mut log), &mut |r| {
        let s = smoothed.map_or(r.loss, |s| 0.98 * s + 0.02 * r.loss);
        smoothed = Some(s);
        bar.set_message(format!("{s:.4} (lr {:.1e}, |g| {:.2})", r.lr, r.grad_norm));
        bar.set_position(r.step);
        Flow::Continue
    });
    bar.finish();
    match result {
        Ok(()) => Ok(()),
        Err(TrainError::Cancelled { step }) => bail!("stopped at step {step}"),
        Err(e) => Err(e.into()),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, flag: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{flag} {}", path.display()))
}

fn train_autoencoder(a: AutoencoderArgs) -> Result<()> {
    let run = a.run.prepare()?;
    if a.crop == 0 || a.crop % 8 != 0 {
        bail!("--crop {} must be a positive multiple of 8", a.crop);
    }
    if !(a.zoom_max >= 1.0) {
        bail!("--zoom-max {} must be ≥ 1", a.zoom_max);
    }
    let mut config: AutoencoderConfig = match &a.config {
        Some(p) => read_json(p, "--config")?,
        None => presets::tiny_autoencoder(),
    };
    config.validate().map_err(|e| anyhow::anyhow!("--config: {e}"))?;
    let varmap = VarMap::new();
    let model = Autoencoder::new(&config, seeded_var_builder(&varmap, a.run.seed, DType::F32, &run.device))?;
    let meta = BTreeMap::from([
        (META_KIND.to_string(), "autoencoder".to_string()),
        (META_CONFIG.to_string(), serde_json::to_string(&config)?),
    ]);
    let mut trainer = Trainer::new(named_vars(&varmap), a.run.config(None), AUTOENCODER_LAYOUT, meta)?;
    let zoom = Zoom { min: 1.0, max: a.zoom_max };
    let mut objective = AutoencoderObjective {
        model: &model,
        photos: &run.photos,
        batch: a.run.batch,
        crop: a.crop,
        zoom,
        kl_weight: a.kl_weight,
        device: run.device.clone(),
    };
    fit(&mut trainer, &mut objective, &a.run, &run)?;

    // The scale that gives the latents unit variance, measured on fresh crops.
    let mut rng = rng_for(a.run.seed ^ 0x5ca1e, Stream::Train);
    config.scaling_factor = latent_scale(&model, &run.photos, &mut rng, a.scale_batches, a.run.batch, a.crop, zoom, &run.device)?;
    let weights = trainer.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let vae = a.run.out.join("vae");
    export_autoencoder(&vae, &config, weights)?;
    eprintln!("latent scaling factor {:.5}; autoencoder written to {}", config.scaling_factor, vae.display());
    Ok(())
}

/// Loads the frozen autoencoder and encodes (or reuses) the training latents.
fn latents(
    latent: &LatentArgs,
    run_args: &RunArgs,
    run: &Run,
    size: u32,
    zoom: Zoom,
    factor: Option<u32>,
) -> Result<(Autoencoder, LatentSet)> {
    if size == 0 || size % 8 != 0 {
        bail!("--size {size} must be a positive multiple of 8");
    }
    let ae = Autoencoder::load_diffusers_dir(&latent.autoencoder, DType::F32, &run.device)
        .with_context(|| format!("--autoencoder {}", latent.autoencoder.display()))?;
    let weights = latent.autoencoder.join("diffusion_pytorch_model.safetensors");
    let stamp = std::fs::metadata(&weights)
        .and_then(|m| m.modified())
        .map(|t| t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0))
        .unwrap_or(0);
    // The cache is valid only for the same photos, autoencoder, sizes, count and seed.
    let meta: HashMap<String, String> = HashMap::from([
        ("photos".into(), run.photos.names.join(",")),
        ("autoencoder".into(), format!("{}@{stamp}", weights.display())),
        ("size".into(), size.to_string()),
        ("factor".into(), factor.map_or("none".into(), |f| f.to_string())),
        ("zoom".into(), format!("{}..{}", zoom.min, zoom.max)),
        ("count".into(), latent.latents.to_string()),
        ("seed".into(), run_args.seed.to_string()),
    ]);
    let cache = run_args.out.join("latents.safetensors");
    if let Some(set) = LatentSet::load_if_matching(&cache, &meta)? {
        eprintln!("{} cached latents from {}", set.len(), cache.display());
        return Ok((ae, set));
    }
    let bar = ProgressBar::new(latent.latents as u64);
    bar.set_style(ProgressStyle::with_template("encoding {bar:30} {pos}/{len} crops  ETA {eta_precise}").expect("static template"));
    let mut rng = rng_for(run_args.seed ^ 0x1a7e47, Stream::Train);
    let set = LatentSet::precompute(
        &run.photos,
        &ae,
        &mut rng,
        latent.latents,
        size,
        zoom,
        factor,
        16,
        &run.device,
        &mut |done, _| bar.set_position(done as u64),
    )?;
    bar.finish();
    set.save(&cache, meta)?;
    Ok((ae, set))
}

fn unet_config(latent: &LatentArgs, default: UNetConfig) -> Result<UNetConfig> {
    let config = match &latent.unet_config {
        Some(p) => read_json(p, "--unet-config")?,
        None => default,
    };
    config.validate().map_err(|e| anyhow::anyhow!("--unet-config: {e}"))?;
    Ok(config)
}

/// A fresh UNet and its trainer (EMA on, with the paper's settings but `--ema-after`).
fn start_unet(
    kind: &str,
    config: &UNetConfig,
    run_args: &RunArgs,
    latent: &LatentArgs,
    run: &Run,
    extra: &HashMap<String, String>,
) -> Result<(EfficientUNet, Trainer)> {
    let varmap = VarMap::new();
    let net = EfficientUNet::new(config, seeded_var_builder(&varmap, run_args.seed, DType::F32, &run.device))?;
    let mut meta: BTreeMap<String, String> = extra.clone().into_iter().collect();
    meta.insert(META_KIND.into(), kind.into());
    meta.insert(META_CONFIG.into(), serde_json::to_string(config)?);
    let ema = EmaConfig { update_after_step: latent.ema_after, ..EmaConfig::default() };
    let trainer = Trainer::new(named_vars(&varmap), run_args.config(Some(ema)), UNET_LAYOUT, meta)?;
    Ok((net, trainer))
}

/// Exports the EMA weights to OUT/unet.safetensors.
fn finish_unet(trainer: &Trainer, config: &UNetConfig, run_args: &RunArgs, extra: HashMap<String, String>) -> Result<()> {
    let weights: Vec<(String, Tensor)> = trainer.ema().context("UNet runs keep an EMA")?.weights().to_vec();
    let path = run_args.out.join("unet.safetensors");
    export_unet(&path, config, weights, extra)?;
    // The profile TOML names the config as its own JSON file.
    let json_path = run_args.out.join("unet.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(config)? + "\n").with_context(|| json_path.display().to_string())?;
    eprintln!("EMA weights written to {} (config {})", path.display(), json_path.display());
    Ok(())
}

fn train_cfm(a: CfmArgs) -> Result<()> {
    let run = a.run.prepare()?;
    let mode: UpsampleMode = a.upsample.parse().map_err(|e: String| anyhow::anyhow!("--upsample: {e}"))?;
    if mode == UpsampleMode::Psu {
        bail!("--upsample psu is not supported for training (z_up would need a decode/encode per step); use bilinear or nearest");
    }
    if a.factor < 2 || a.size % (8 * a.factor) != 0 {
        bail!("--factor {} must be ≥ 2 and --size {} a multiple of 8·factor", a.factor, a.size);
    }
    if a.noising_step >= DIFFUSION_STEPS {
        bail!("--noising-step {} must be < {DIFFUSION_STEPS}", a.noising_step);
    }
    if !(a.zoom_max >= 1.0) {
        bail!("--zoom-max {} must be ≥ 1", a.zoom_max);
    }
    let config = unet_config(&a.latent, presets::tiny_hop_unet())?;
    let (ae, data) = latents(&a.latent, &a.run, &run, a.size, Zoom { min: 1.0, max: a.zoom_max }, Some(a.factor))?;
    let channels = ae.config().latent_channels;
    if config.in_channels != 2 * channels || config.out_channels != channels {
        bail!("--unet-config: a hop on {channels}-channel latents needs in_channels {} and out_channels {channels}", 2 * channels);
    }
    let alpha_bar = alpha_bar_cosine()[a.noising_step];
    let resize = move |z: &Tensor, hw: (usize, usize)| upsample(z, mode, hw, None);
    let extra = HashMap::from([
        ("upsample".to_string(), mode.to_string()),
        ("noising_step".to_string(), a.noising_step.to_string()),
        ("factor".to_string(), a.factor.to_string()),
    ]);
    let (net, mut trainer) = start_unet("cfm", &config, &a.run, &a.latent, &run, &extra)?;
    let mut objective =
        CfmHopObjective { net: &net, data: &data, batch: a.run.batch, alpha_bar, resize: &resize, device: run.device.clone() };
    fit(&mut trainer, &mut objective, &a.run, &run)?;
    finish_unet(&trainer, &config, &a.run, extra)
}

fn train_base(a: BaseArgs) -> Result<()> {
    let run = a.run.prepare()?;
    if !(a.zoom_min >= 1.0 && a.zoom_max >= a.zoom_min) {
        bail!("--zoom-min {} / --zoom-max {}: need 1 ≤ min ≤ max", a.zoom_min, a.zoom_max);
    }
    let config = unet_config(&a.latent, presets::tiny_base_unet())?;
    let (ae, data) = latents(&a.latent, &a.run, &run, a.size, Zoom { min: a.zoom_min, max: a.zoom_max }, None)?;
    let channels = ae.config().latent_channels;
    if config.in_channels != channels || config.out_channels != channels {
        bail!("--unet-config: the base generator on {channels}-channel latents needs in_channels = out_channels = {channels}");
    }
    let extra = HashMap::from([("latent_size".to_string(), (a.size / 8).to_string())]);
    let (net, mut trainer) = start_unet("base", &config, &a.run, &a.latent, &run, &extra)?;
    let mut objective = BaseObjective { net: &net, data: &data, batch: a.run.batch, device: run.device.clone() };
    fit(&mut trainer, &mut objective, &a.run, &run)?;
    finish_unet(&trainer, &config, &a.run, extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["t"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().run
    }

    fn photo_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::from_pixel(40, 30, image::Rgb([1, 2, 3])).save(dir.path().join("a.png")).unwrap();
        dir
    }

    #[test]
    fn bad_flags_and_folders_are_named() {
        let photos = photo_dir();
        let out = tempfile::tempdir().unwrap();
        let data = photos.path().to_str().unwrap();
        let out_dir = out.path().join("run");
        let out_str = out_dir.to_str().unwrap();

        let err = run_args(&["--data", data, "--out", out_str, "--steps", "0"]).prepare().err().unwrap();
        assert!(err.to_string().contains("--steps"), "{err}");
        let err = run_args(&["--data", data, "--out", out_str, "--steps", "5", "--resume"]).prepare().err().unwrap();
        assert!(err.to_string().contains("--resume"), "{err}");
        let err = run_args(&["--data", "/nonexistent/photos", "--out", out_str, "--steps", "5"]).prepare().err().unwrap();
        assert!(format!("{err:#}").contains("--data /nonexistent/photos"), "{err:#}");
        let err = run_args(&["--data", data, "--out", out_str, "--steps", "5", "--cooldown", "6"]).prepare().err().unwrap();
        assert!(err.to_string().contains("--cooldown 6"), "{err}");
        let err = run_args(&["--data", data, "--out", out_str, "--steps", "5", "--device", "tpu"]).prepare().err().unwrap();
        assert!(err.to_string().contains("tpu"), "{err}");

        let run = run_args(&["--data", data, "--out", out_str, "--steps", "5"]).prepare().unwrap();
        assert_eq!(run.photos.images.len(), 1);
        std::fs::write(out_dir.join("checkpoint.safetensors"), b"x").unwrap();
        let err = run_args(&["--data", data, "--out", out_str, "--steps", "5"]).prepare().err().unwrap();
        assert!(err.to_string().contains("pass --resume"), "{err}");
    }
}

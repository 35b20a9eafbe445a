//! `fmboost eval upscale`: PSNR/SSIM of the CFM chain against latent-bilinear, bicubic and the
//! autoencoder's own reconstruction, on 256² crops of a folder of photos
//! (protocol: `fmboost_models::eval`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args as ClapArgs, Subcommand};
use fmboost_models::autoencoder::Autoencoder;
use fmboost_models::cfm::{bilinear_resize, load_unet_file, CfmChain, CfmHop, HopConfig, Solver, UpsampleMode};
use fmboost_models::eval::{self, Bicubic, Method, MethodError, Reconstructor, Upscaler};
use fmboost_models::pixels;
use fmboost_models::progress::Flow;
use fmboost_models::train::export::read_unet_config;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Upscaling quality on photo crops: cfm, latent_bilinear, bicubic, ae_ceiling.
    Upscale(UpscaleArgs),
}

#[derive(ClapArgs)]
struct UpscaleArgs {
    /// 2 (one CFM hop) or 4 (two hops).
    #[arg(long)]
    scale: u32,
    /// Folder of PNG/JPEG photos.
    #[arg(long, default_value = "data/photos/heldout")]
    data: PathBuf,
    /// JSON report; the markdown table and the contact sheet go next to it (.md, .png).
    #[arg(long, default_value = "eval-upscale.json")]
    report: PathBuf,
    /// The autoencoder (a diffusers `vae/` folder).
    #[arg(long)]
    autoencoder: PathBuf,
    /// CFM hop weights (`unet.safetensors` of `fmboost train cfm`), in chain order; the chain
    /// uses the first log2(scale) of them.
    #[arg(long = "hop", required = true)]
    hops: Vec<PathBuf>,
    /// ODE solver of every hop.
    #[arg(long, default_value = "euler")]
    solver: String,
    /// Solver steps per hop.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Seed of the CFM noise augmentation (each crop uses seed + its index).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Crops shown in the contact sheet.
    #[arg(long, default_value_t = 4)]
    sheet_rows: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Upscale(a) => upscale(a),
    }
}

fn method_error(e: candle_core::Error) -> MethodError {
    Box::new(e)
}

fn image_to_latent(ae: &Autoencoder, img: &RgbImage, device: &Device) -> candle_core::Result<candle_core::Tensor> {
    ae.encode(&pixels::to_tensor(&[img], device)?)
}

fn latent_to_image(ae: &Autoencoder, z: &candle_core::Tensor) -> candle_core::Result<RgbImage> {
    let mut images = pixels::from_tensor(&ae.decode(z)?)?;
    Ok(images.remove(0))
}

/// The autoencoder's round trip of the high-res crop: the ceiling of every latent method.
struct AeCeiling<'a> {
    ae: &'a Autoencoder,
    device: Device,
}

impl Reconstructor for AeCeiling<'_> {
    fn reconstruct(&mut self, high: &RgbImage) -> Result<RgbImage, MethodError> {
        let z = image_to_latent(self.ae, high, &self.device).map_err(method_error)?;
        latent_to_image(self.ae, &z).map_err(method_error)
    }
}

/// A1111's "Latent" upscaler: encode, bilinear in latent space, decode.
struct LatentBilinear<'a> {
    ae: &'a Autoencoder,
    device: Device,
}

impl Upscaler for LatentBilinear<'_> {
    fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError> {
        let z = image_to_latent(self.ae, low, &self.device).map_err(method_error)?;
        let (_, _, h, w) = z.dims4().map_err(method_error)?;
        let s = scale as usize;
        let up = bilinear_resize(&z, (h * s, w * s)).map_err(method_error)?;
        latent_to_image(self.ae, &up).map_err(method_error)
    }
}

/// Encode, the CFM chain, decode.
struct CfmUpscaler<'a> {
    ae: &'a Autoencoder,
    chain: CfmChain,
    device: Device,
    seed: u64,
    crops_done: u64,
}

impl Upscaler for CfmUpscaler<'_> {
    fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError> {
        let z = image_to_latent(self.ae, low, &self.device).map_err(method_error)?;
        let (_, _, h, _) = z.dims4().map_err(method_error)?;
        let out = self.chain.output_hw((h, h)).0;
        if out != h * scale as usize {
            return Err(format!("the chain lifts by {}, not {scale}", out / h).into());
        }
        let seed = self.seed.wrapping_add(self.crops_done);
        self.crops_done += 1;
        let sample = self.chain.sample(&z, &[seed], None, &mut |_| Flow::Continue)?;
        latent_to_image(self.ae, &sample.latent).map_err(method_error)
    }
}

fn load_hop(path: &PathBuf, solver: Solver, steps: usize, device: &Device) -> Result<CfmHop> {
    let config = read_unet_config(path).map_err(anyhow::Error::msg).context("--hop")?;
    let bytes = std::fs::read(path).with_context(|| format!("--hop {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("--hop {}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| meta.get(key).with_context(|| format!("--hop {}: metadata lacks `{key}`", path.display()));
    let upsample: UpsampleMode = get("upsample")?.parse().map_err(anyhow::Error::msg)?;
    let noising_step: usize = get("noising_step")?.parse().context("noising_step")?;
    let factor: usize = get("factor")?.parse().context("factor")?;
    let (unet, _) = load_unet_file(path, &config, device, DType::F32).with_context(|| format!("--hop {}", path.display()))?;
    Ok(CfmHop { config: HopConfig { upsample, solver, steps, noising_step, factor }, unet })
}

fn upscale(a: UpscaleArgs) -> Result<()> {
    let hops_needed = match a.scale {
        2 => 1,
        4 => 2,
        other => bail!("--scale {other}: expected 2 or 4"),
    };
    if a.hops.len() < hops_needed {
        bail!("--scale {} needs {hops_needed} --hop files, got {}", a.scale, a.hops.len());
    }
    // Fail before the (long) evaluation if the report cannot be written.
    if let Some(dir) = a.report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--report {}", a.report.display()))?;
    }
    let device = fmboost_models::device::parse_device(&a.device).map_err(anyhow::Error::msg)?;
    let solver: Solver = a.solver.parse().map_err(|e: String| anyhow::anyhow!("--solver: {e}"))?;
    let ae = Autoencoder::load_diffusers_dir(&a.autoencoder, DType::F32, &device)
        .with_context(|| format!("--autoencoder {}", a.autoencoder.display()))?;
    let hops = a.hops[..hops_needed].iter().map(|p| load_hop(p, solver, a.steps, &device)).collect::<Result<Vec<_>>>()?;
    let chain = CfmChain::new(hops).map_err(anyhow::Error::msg)?;
    let crops = eval::load_crops(&a.data, a.scale).with_context(|| format!("--data {}", a.data.display()))?;
    eprintln!("{} crops from {}", crops.len(), a.data.display());

    let mut cfm = CfmUpscaler { ae: &ae, chain, device: device.clone(), seed: a.seed, crops_done: 0 };
    let mut latent_bilinear = LatentBilinear { ae: &ae, device: device.clone() };
    let mut bicubic = Bicubic;
    let mut ceiling = AeCeiling { ae: &ae, device: device.clone() };
    let mut methods = vec![
        ("cfm".to_string(), Method::Upscale(&mut cfm)),
        ("latent_bilinear".to_string(), Method::Upscale(&mut latent_bilinear)),
        ("bicubic".to_string(), Method::Upscale(&mut bicubic)),
        ("ae_ceiling".to_string(), Method::Reconstruct(&mut ceiling)),
    ];
    let bar = ProgressBar::new(crops.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} crops  ETA {eta_precise}").expect("static template"));
    let evaluation = eval::evaluate(&crops, a.scale, &mut methods, a.sheet_rows, &mut |done, _| {
        bar.set_position(done as u64);
        true
    })?;
    bar.finish();

    let report = &evaluation.report;
    let json = report.to_json().map_err(anyhow::Error::msg)?;
    std::fs::write(&a.report, json + "\n").with_context(|| format!("--report {}", a.report.display()))?;
    let md = report.to_markdown();
    std::fs::write(a.report.with_extension("md"), &md).with_context(|| format!("{}", a.report.with_extension("md").display()))?;
    // Contact sheet rows: low-res input (nearest, to size), each method, ground truth.
    let rows: Vec<Vec<RgbImage>> = evaluation
        .outputs
        .into_iter()
        .zip(&crops)
        .map(|(outputs, crop)| {
            let (w, h) = crop.high.dimensions();
            let mut row = vec![image::imageops::resize(&crop.low, w, h, image::imageops::FilterType::Nearest)];
            row.extend(outputs);
            row.push(crop.high.clone());
            row
        })
        .collect();
    let sheet_path = a.report.with_extension("png");
    eval::contact_sheet(&rows).map_err(anyhow::Error::msg)?.save(&sheet_path).with_context(|| format!("{}", sheet_path.display()))?;
    println!("{md}");
    eprintln!(
        "report {}, table {}, contact sheet {} (columns: low-res, cfm, latent_bilinear, bicubic, ae_ceiling, ground truth)",
        a.report.display(),
        a.report.with_extension("md").display(),
        sheet_path.display()
    );
    Ok(())
}

//! `fmboost eval upscale`: PSNR/SSIM of the CFM chain against latent-bilinear, bicubic and the
//! autoencoder's own reconstruction, on 256² crops of a folder of photos
//! (protocol: `fmboost_models::eval`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args as ClapArgs, Subcommand};
use fmboost_core::profile::ProfileInfo;
use fmboost_engine::registry::resolve_profile;
use fmboost_engine::stack::{Needs, ProfileModels};
use fmboost_models::cfm::{bilinear_resize, Solver};
use fmboost_models::eval::{self, Bicubic, Method, MethodError, Reconstructor, Upscaler};
use fmboost_models::pixels;
use fmboost_models::progress::Flow;
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
    /// Folder of PNG/JPEG photos (default: the held-out split that scripts/fetch-photos.sh
    /// fetches, docs/data/photos.txt).
    #[arg(long, default_value = "data/photos/heldout")]
    data: PathBuf,
    /// JSON report; the markdown table and the contact sheet go next to it (.md, .png).
    #[arg(long, default_value = "eval-upscale.json")]
    report: PathBuf,
    /// Model profile whose autoencoder and CFM hops are evaluated: `tiny` (built in) or a
    /// profile TOML.
    #[arg(long, default_value = "tiny")]
    profile: String,
    /// CFM ODE solver of every hop: euler, midpoint, heun2 or rk4 (default: the profile's).
    #[arg(long)]
    cfm_solver: Option<String>,
    /// CFM solver steps per hop (default: the profile's).
    #[arg(long)]
    cfm_steps: Option<u32>,
    /// Seed of the CFM noise augmentation (crop i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Crops shown in the contact sheet.
    #[arg(long, default_value_t = 4)]
    sheet_rows: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Upscale(a) => upscale(a),
    }
}

fn no_progress() -> impl FnMut(fmboost_models::progress::Step) -> Flow {
    |_| Flow::Continue
}

fn image_to_latent(models: &ProfileModels, img: &RgbImage) -> Result<Tensor, MethodError> {
    Ok(models.encode(&pixels::to_tensor(&[img], &models.device)?)?)
}

fn latent_to_image(models: &ProfileModels, z: &Tensor) -> Result<RgbImage, MethodError> {
    let images = models.decode(z, None, &mut no_progress())?;
    Ok(pixels::from_tensor(&images)?.remove(0))
}

/// The autoencoder's round trip of the high-res crop: the ceiling of every latent method.
struct AeCeiling<'a>(&'a ProfileModels);

impl Reconstructor for AeCeiling<'_> {
    fn reconstruct(&mut self, high: &RgbImage) -> Result<RgbImage, MethodError> {
        latent_to_image(self.0, &image_to_latent(self.0, high)?)
    }
}

/// A1111's "Latent" upscaler: encode, bilinear in latent space, decode.
struct LatentBilinear<'a>(&'a ProfileModels);

impl Upscaler for LatentBilinear<'_> {
    fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError> {
        let z = image_to_latent(self.0, low)?;
        let (_, _, h, w) = z.dims4()?;
        let s = scale as usize;
        latent_to_image(self.0, &bilinear_resize(&z, (h * s, w * s))?)
    }
}

/// Encode, the profile's CFM hops 1..=log2(scale), decode.
struct CfmUpscaler<'a> {
    models: &'a ProfileModels,
    solver: Solver,
    steps: usize,
    seed: u64,
    /// Crops seen so far: crop i's noise is seeded with `seed + i`, so a run is reproducible
    /// and independent of the other methods.
    crops_done: u64,
}

impl Upscaler for CfmUpscaler<'_> {
    fn upscale(&mut self, low: &RgbImage, scale: u32) -> Result<RgbImage, MethodError> {
        let seed = self.seed.wrapping_add(self.crops_done);
        self.crops_done += 1;
        let mut z = image_to_latent(self.models, low)?;
        for hop in 1..=scale.trailing_zeros() {
            z = self.models.hop(hop, &z, &[seed], self.solver, self.steps, &mut no_progress())?;
        }
        latent_to_image(self.models, &z)
    }
}

/// CFM hops of a scale: one per doubling.
fn hops_for_scale(scale: u32) -> Result<usize> {
    match scale {
        2 => Ok(1),
        4 => Ok(2),
        other => bail!("--scale {other}: expected 2 or 4"),
    }
}

fn upscale(a: UpscaleArgs) -> Result<()> {
    let hops_needed = hops_for_scale(a.scale)?;
    if !a.data.is_dir() {
        bail!("--data {}: no such folder (the held-out photos are fetched by scripts/fetch-photos.sh)", a.data.display());
    }
    let device = fmboost_models::device::parse_device(&a.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let info = ProfileInfo::resolve(&a.profile).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    let solver: Solver = match &a.cfm_solver {
        Some(s) => s.parse().map_err(|e: String| anyhow::anyhow!("--cfm-solver: {e}"))?,
        None => info.defaults.cfm_solver.parse().map_err(|e: String| anyhow::anyhow!("profile `{}` [defaults] cfm_solver: {e}", info.name))?,
    };
    let steps = match a.cfm_steps {
        Some(0) => bail!("--cfm-steps 0: must be at least 1"),
        Some(n) => n,
        None if info.defaults.cfm_steps == 0 => bail!("profile `{}` [defaults] cfm_steps: must be at least 1", info.name),
        None => info.defaults.cfm_steps,
    } as usize;
    let (spec, files) = resolve_profile(&a.profile).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    if spec.hops.len() < hops_needed {
        bail!("--scale {} needs {hops_needed} CFM hops; --profile {} has {}", a.scale, a.profile, spec.hops.len());
    }
    // Fail before the (long) evaluation if the report cannot be written.
    if let Some(dir) = a.report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--report {}", a.report.display()))?;
    }
    let crops = eval::load_crops(&a.data, a.scale).with_context(|| format!("--data {}", a.data.display()))?;
    eprintln!("{} crops from {}", crops.len(), a.data.display());
    let needs = Needs { base: false, autoencoder: true, hops: true };
    let models = ProfileModels::load(spec, files, needs, &device).map_err(|e| anyhow::anyhow!("--profile {}: {e}", a.profile))?;
    eprintln!("profile `{}`: {hops_needed} CFM hop(s), {solver:?} × {steps} steps", info.name);

    let mut cfm = CfmUpscaler { models: &models, solver, steps, seed: a.seed, crops_done: 0 };
    let mut latent_bilinear = LatentBilinear(&models);
    let mut bicubic = Bicubic;
    let mut ceiling = AeCeiling(&models);
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: UpscaleArgs,
    }

    fn parse(flags: &[&str]) -> UpscaleArgs {
        Cli::try_parse_from(std::iter::once("eval-upscale").chain(flags.iter().copied())).unwrap().args
    }

    fn error(flags: &[&str]) -> String {
        format!("{:#}", upscale(parse(flags)).unwrap_err())
    }

    #[test]
    fn bad_scale_missing_or_empty_data_and_bad_settings_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let err = error(&["--scale", "3", "--data", data]);
        assert!(err.contains("--scale 3"), "{err}");
        let missing = dir.path().join("nope");
        let err = error(&["--scale", "4", "--data", missing.to_str().unwrap()]);
        assert!(err.contains("--data") && err.contains("nope"), "{err}");
        let report = dir.path().join("r.json");
        let report = report.to_str().unwrap();
        let err = error(&["--scale", "4", "--data", data, "--report", report]);
        assert!(err.contains("--data") && err.contains("no PNG or JPEG"), "{err}");
        image::RgbImage::new(100, 80).save(dir.path().join("small.png")).unwrap();
        let err = error(&["--scale", "4", "--data", data, "--report", report]);
        assert!(err.contains("--data") && err.contains("no 256×256 crop"), "{err}");
        let err = error(&["--scale", "2", "--data", data, "--cfm-solver", "leapfrog"]);
        assert!(err.contains("--cfm-solver") && err.contains("leapfrog"), "{err}");
        let err = error(&["--scale", "2", "--data", data, "--cfm-steps", "0"]);
        assert!(err.contains("--cfm-steps 0"), "{err}");
        let err = error(&["--scale", "2", "--data", data, "--profile", "nope.toml"]);
        assert!(err.contains("--profile") && err.contains("nope.toml"), "{err}");
        assert!(Cli::try_parse_from(["eval-upscale", "--scale", "4", "--autoencoder", "vae"]).is_err());
    }

    #[test]
    fn evaluates_the_tiny_profile_and_writes_report_table_and_sheet() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("photos");
        std::fs::create_dir(&data).unwrap();
        // One 256² crop of smooth colour ramps.
        image::RgbImage::from_fn(300, 260, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) / 3) as u8]))
            .save(data.join("ramp.png"))
            .unwrap();
        let report = dir.path().join("out/eval.json");
        let flags = ["--scale", "4", "--data", data.to_str().unwrap(), "--report", report.to_str().unwrap(), "--cfm-steps", "1"];
        upscale(parse(&flags)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(json["scale"], 4);
        assert_eq!(json["crops"], 1);
        for method in ["cfm", "latent_bilinear", "bicubic", "ae_ceiling"] {
            let psnr = json["methods"][method]["psnr"].as_f64().unwrap();
            let ssim = json["methods"][method]["ssim"].as_f64().unwrap();
            assert!(psnr.is_finite() && psnr > 0.0 && ssim.is_finite() && ssim <= 1.0, "{method}: {psnr} {ssim}");
        }
        let table = std::fs::read_to_string(report.with_extension("md")).unwrap();
        assert!(table.contains("latent_bilinear") && table.contains("ae_ceiling"), "{table}");
        let sheet = image::open(report.with_extension("png")).unwrap();
        // Columns: low-res, four methods, ground truth.
        assert!(sheet.width() >= 6 * 256, "{}", sheet.width());
    }
}

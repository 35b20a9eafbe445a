//! The job-spec flags shared by `fmboost submit` (the cluster) and `fmboost generate` /
//! `fmboost upscale` (in process), so one spec means one job wherever it runs. Flags left
//! out are sent unset and take the profile's defaults (its `[defaults]` table).

use std::path::PathBuf;

use anyhow::{bail, Context};
use fmboost_proto::v1 as pb;
use prost::Message;

#[derive(clap::Args, Debug, Clone)]
pub struct JobSpecArgs {
    /// Text prompt (the default source; the tiny profile is unconditional and takes none).
    #[arg(long, default_value = "", conflicts_with_all = ["latent", "image"])]
    pub prompt: String,
    #[arg(long, default_value = "", conflicts_with_all = ["latent", "image"])]
    pub negative_prompt: String,
    /// Start the CFM chain from a latent: a file holding a protobuf `fmboost.v1.Tensor`
    /// (as written by `--latent-out`).
    #[arg(long, conflicts_with = "image")]
    pub latent: Option<PathBuf>,
    /// Super-resolve a PNG or JPEG image: encode, CFM hops, decode.
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Base image width in pixels, a multiple of 8 (text prompts; default: the profile's).
    #[arg(long)]
    pub width: Option<u32>,
    /// Base image height in pixels, a multiple of 8 (text prompts; default: the profile's).
    #[arg(long)]
    pub height: Option<u32>,
    /// Base steps (text prompts; default: the profile's).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Base scheduler: ddim, euler_a or lcm for Stable Diffusion; euler for flow-matching
    /// bases such as tiny's (default: the profile's).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Classifier-free guidance scale (text prompts; default: the profile's).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// CFM hops, each 2× the latent size; 0 skips the CFM stage (default: the profile's).
    #[arg(long)]
    pub hops: Option<u32>,
    /// CFM ODE solver: euler, midpoint, heun2 or rk4 (default: the profile's).
    #[arg(long)]
    pub cfm_solver: Option<String>,
    /// CFM solver steps (default: the profile's).
    #[arg(long)]
    pub cfm_steps: Option<u32>,
    /// Decoder tile size in latent pixels; 0 decodes in one piece (tiled automatically when
    /// the latent is large).
    #[arg(long, default_value_t = 0)]
    pub tile: u32,
    /// Overlap of decoder tiles in latent pixels (needs --tile).
    #[arg(long, default_value_t = 0)]
    pub tile_overlap: u32,
    /// Model profile: `tiny` (built in), or what the cluster serves.
    #[arg(long, default_value = "tiny")]
    pub profile: String,
}

impl JobSpecArgs {
    /// The spec as the API takes it (priority, deadline and idempotency key unset).
    pub fn to_proto(&self) -> anyhow::Result<pb::JobSpec> {
        use pb::job_spec::Source;
        let text_only = [
            ("--width", self.width.is_some()),
            ("--height", self.height.is_some()),
            ("--steps", self.steps.is_some()),
            ("--scheduler", self.scheduler.is_some()),
            ("--guidance", self.guidance.is_some()),
        ];
        let (source, base) = if let Some(path) = &self.latent {
            reject_flags(&text_only, "--latent")?;
            let bytes = std::fs::read(path).with_context(|| format!("--latent {}", path.display()))?;
            let tensor = pb::Tensor::decode(bytes.as_slice()).with_context(|| format!("--latent {}: not a protobuf Tensor", path.display()))?;
            (Source::Latent(tensor), None)
        } else if let Some(path) = &self.image {
            reject_flags(&text_only, "--image")?;
            let data = std::fs::read(path).with_context(|| format!("--image {}", path.display()))?;
            (Source::Image(pb::ImageSource { data }), None)
        } else {
            let text = pb::TextSource { prompt: self.prompt.clone(), negative_prompt: self.negative_prompt.clone() };
            let base = pb::BaseSettings {
                width: self.width,
                height: self.height,
                steps: self.steps,
                scheduler: self.scheduler.clone(),
                guidance: self.guidance,
            };
            (Source::Text(text), Some(base))
        };
        if self.hops == Some(0) {
            reject_flags(&[("--cfm-solver", self.cfm_solver.is_some()), ("--cfm-steps", self.cfm_steps.is_some())], "--hops 0")?;
        }
        let cfm = pb::CfmSettings { hops: self.hops, solver: self.cfm_solver.clone(), steps: self.cfm_steps };
        Ok(pb::JobSpec {
            source: Some(source),
            seed: self.seed,
            base,
            cfm: Some(cfm),
            decode: Some(pb::DecodeSettings { tile: self.tile, overlap: self.tile_overlap }),
            profile: self.profile.clone(),
            ..Default::default()
        })
    }
}

fn reject_flags(flags: &[(&str, bool)], context: &str) -> anyhow::Result<()> {
    match flags.iter().find(|(_, given)| *given) {
        Some((flag, _)) => bail!("{flag} does not apply with {context}"),
        None => Ok(()),
    }
}

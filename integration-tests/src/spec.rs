//! The job spec the harness submits: from flags or a JSON file (`--spec FILE`), checked with the
//! cluster's own validation (`fmboost_core::spec::validate`) before any load is sent.
//!
//! JSON form (every field optional except `profile` and `source`; unset settings take the
//! profile's defaults; unknown fields are errors):
//! `{"profile": "sleep", "seed": 7, "priority": "normal",
//!   "source": {"text": {"prompt": "...", "negative_prompt": ""}} | {"image": {"path": "in.png"}},
//!   "base": {"width": 64, "height": 64, "steps": 4, "scheduler": "ddim", "guidance": 1.0},
//!   "cfm": {"hops": 2, "solver": "euler", "steps": 4}, "decode": {"tile": 0, "overlap": 0}}`

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fmboost_core::profile::ProfileInfo;
use fmboost_core::spec::{validate, Limits};
use fmboost_proto::v1 as pb;
use serde::Deserialize;

/// Largest upload the harness checks against (the coordinator's default `--max-upload-bytes`).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct SpecFlags {
    /// The job spec as JSON (see docs/loadtest.md); excludes the spec flags below.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Model profile the jobs name (`tiny`, `sleep`, ...).
    #[arg(long, default_value = "tiny", conflicts_with = "spec")]
    pub profile: String,
    /// Text prompt (empty for unconditional profiles such as tiny).
    #[arg(long, default_value = "", conflicts_with = "spec")]
    pub prompt: String,
    #[arg(long, default_value = "", conflicts_with = "spec")]
    pub negative_prompt: String,
    /// Upscale this PNG/JPEG instead of generating from the prompt (no base settings then).
    #[arg(long, conflicts_with_all = ["spec", "prompt", "negative_prompt", "width", "height", "steps", "scheduler", "guidance"])]
    pub image: Option<PathBuf>,
    /// Base image width in pixels, a multiple of 8 (default: the profile's).
    #[arg(long, conflicts_with = "spec")]
    pub width: Option<u32>,
    /// Base image height in pixels (default: the profile's).
    #[arg(long, conflicts_with = "spec")]
    pub height: Option<u32>,
    /// Base steps (default: the profile's).
    #[arg(long, conflicts_with = "spec")]
    pub steps: Option<u32>,
    /// Base scheduler (default: the profile's).
    #[arg(long, conflicts_with = "spec")]
    pub scheduler: Option<String>,
    /// Guidance scale (default: the profile's).
    #[arg(long, conflicts_with = "spec")]
    pub guidance: Option<f32>,
    /// CFM hops, each 2× the latent (default: the profile's).
    #[arg(long, conflicts_with = "spec")]
    pub hops: Option<u32>,
    /// CFM ODE solver (default: the profile's); not with --hops 0.
    #[arg(long, conflicts_with = "spec")]
    pub solver: Option<String>,
    /// ODE steps per CFM hop (default: the profile's); not with --hops 0.
    #[arg(long, conflicts_with = "spec")]
    pub cfm_steps: Option<u32>,
    /// Decoder tile (latent pixels); 0 decodes in one piece.
    #[arg(long, default_value_t = 0, conflicts_with = "spec")]
    pub tile: u32,
    #[arg(long, default_value_t = 0, conflicts_with = "spec")]
    pub overlap: u32,
    /// low, normal or high.
    #[arg(long, default_value = "normal", conflicts_with = "spec")]
    pub priority: String,
    /// Seed of the first job; with `--seeds K` jobs use seeds SEED..SEED+K-1 in turn. With
    /// `--spec`, the file's seed is the first.
    #[arg(long, default_value_t = 0, conflicts_with = "spec")]
    pub seed: u64,
    /// Distinct seeds (jobs sharing a seed must give identical PNGs).
    #[arg(long, default_value_t = 4)]
    pub seeds: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    profile: String,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_priority")]
    priority: String,
    source: SourceFile,
    base: Option<BaseFile>,
    cfm: Option<CfmFile>,
    decode: Option<DecodeFile>,
}

fn default_priority() -> String {
    "normal".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum SourceFile {
    Text {
        prompt: String,
        #[serde(default)]
        negative_prompt: String,
    },
    Image {
        path: PathBuf,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseFile {
    width: Option<u32>,
    height: Option<u32>,
    steps: Option<u32>,
    scheduler: Option<String>,
    guidance: Option<f32>,
}

/// Unset fields take the profile's defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CfmFile {
    hops: Option<u32>,
    solver: Option<String>,
    steps: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecodeFile {
    #[serde(default)]
    tile: u32,
    #[serde(default)]
    overlap: u32,
}

/// What every job is made from: a template plus the seeds to cycle through.
#[derive(Debug, Clone)]
pub struct JobTemplate {
    pub spec: pb::JobSpec,
    /// CFM hops each job runs (after the profile's defaults).
    pub hops: u32,
    pub first_seed: u64,
    pub seeds: u64,
}

impl JobTemplate {
    /// The spec of job `index`: its seed and its own idempotency key.
    pub fn job(&self, index: u64, key_prefix: &str) -> pb::JobSpec {
        pb::JobSpec { seed: self.seed_of(index), idempotency_key: format!("{key_prefix}-{index}"), ..self.spec.clone() }
    }

    pub fn seed_of(&self, index: u64) -> u64 {
        self.first_seed.wrapping_add(index % self.seeds)
    }
}

fn parse_priority(name: &str, origin: &str) -> anyhow::Result<pb::Priority> {
    Ok(match name {
        "low" => pb::Priority::Low,
        "normal" => pb::Priority::Normal,
        "high" => pb::Priority::High,
        other => bail!("{origin}priority {other:?}: expected low, normal or high"),
    })
}

fn read_image(path: &Path, origin: &str) -> anyhow::Result<pb::job_spec::Source> {
    let data = std::fs::read(path).with_context(|| format!("{origin}image {}", path.display()))?;
    Ok(pb::job_spec::Source::Image(pb::ImageSource { data }))
}

impl SpecFlags {
    pub fn template(&self) -> anyhow::Result<JobTemplate> {
        if self.seeds == 0 {
            bail!("--seeds 0: must be at least 1");
        }
        let (spec, origin) = match &self.spec {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("--spec {}", path.display()))?;
                (spec_from_json(&text, path)?, format!("--spec {}: ", path.display()))
            }
            None => (self.spec_from_flags()?, "job spec flags: ".to_string()),
        };
        // The cluster validates again; checking here stops a run of thousands of rejections.
        // A profile this binary does not know (one a remote cluster serves from a file) is
        // checked as the `sleep` stand-in for Stable Diffusion (its defaults and
        // capabilities); the coordinator applies the real ones.
        let profile = ProfileInfo::resolve(&spec.profile).unwrap_or_else(|_| ProfileInfo {
            name: spec.profile.clone(),
            ..ProfileInfo::resolve(fmboost_core::sleep::PROFILE).expect("the built-in sleep profile")
        });
        let limits = Limits::new(vec![profile], MAX_UPLOAD_BYTES);
        let (admitted, _) = validate(spec.clone(), &limits, fmboost_core::now_unix_ms()).map_err(|e| anyhow::anyhow!("{origin}{e}"))?;
        Ok(JobTemplate { first_seed: spec.seed, hops: admitted.cfm.hops, spec, seeds: self.seeds })
    }

    fn spec_from_flags(&self) -> anyhow::Result<pb::JobSpec> {
        let origin = "--";
        let (source, base) = match &self.image {
            Some(path) => (read_image(path, origin)?, None),
            None => (
                pb::job_spec::Source::Text(pb::TextSource { prompt: self.prompt.clone(), negative_prompt: self.negative_prompt.clone() }),
                Some(pb::BaseSettings {
                    width: self.width,
                    height: self.height,
                    steps: self.steps,
                    scheduler: self.scheduler.clone(),
                    guidance: self.guidance,
                }),
            ),
        };
        if self.hops == Some(0) && (self.solver.is_some() || self.cfm_steps.is_some()) {
            bail!("--solver and --cfm-steps need --hops of at least 1");
        }
        let cfm = pb::CfmSettings { hops: self.hops, solver: self.solver.clone(), steps: self.cfm_steps };
        Ok(pb::JobSpec {
            source: Some(source),
            seed: self.seed,
            base,
            cfm: Some(cfm),
            decode: Some(pb::DecodeSettings { tile: self.tile, overlap: self.overlap }),
            profile: self.profile.clone(),
            priority: parse_priority(&self.priority, origin)? as i32,
            deadline_unix_ms: 0,
            idempotency_key: String::new(),
        })
    }
}

/// Parses the JSON spec file; an image path is relative to the file's directory.
fn spec_from_json(text: &str, path: &Path) -> anyhow::Result<pb::JobSpec> {
    let origin = format!("--spec {}: ", path.display());
    let file: SpecFile = serde_json::from_str(text).with_context(|| format!("--spec {}: not a job spec", path.display()))?;
    let source = match file.source {
        SourceFile::Text { prompt, negative_prompt } => pb::job_spec::Source::Text(pb::TextSource { prompt, negative_prompt }),
        SourceFile::Image { path: image } => read_image(&path.parent().unwrap_or(Path::new(".")).join(image), &format!("{origin}source."))?,
    };
    Ok(pb::JobSpec {
        source: Some(source),
        seed: file.seed,
        base: file.base.map(|b| pb::BaseSettings { width: b.width, height: b.height, steps: b.steps, scheduler: b.scheduler, guidance: b.guidance }),
        cfm: file.cfm.map(|c| pb::CfmSettings { hops: c.hops, solver: c.solver, steps: c.steps }),
        decode: file.decode.map(|d| pb::DecodeSettings { tile: d.tile, overlap: d.overlap }),
        profile: file.profile,
        priority: parse_priority(&file.priority, &origin)? as i32,
        deadline_unix_ms: 0,
        idempotency_key: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        spec: SpecFlags,
    }

    fn flags(args: &[&str]) -> SpecFlags {
        Wrapper::try_parse_from(std::iter::once("t").chain(args.iter().copied())).unwrap().spec
    }

    #[test]
    fn builds_a_valid_spec_from_flags_and_cycles_seeds() {
        let template = flags(&["--profile", "sleep", "--seed", "10", "--seeds", "3"]).template().unwrap();
        assert_eq!(template.spec.profile, "sleep");
        let seeds: Vec<u64> = (0..5).map(|i| template.job(i, "k").seed).collect();
        assert_eq!(seeds, [10, 11, 12, 10, 11]);
        assert_eq!(template.job(4, "run").idempotency_key, "run-4");
    }

    #[test]
    fn invalid_flags_name_the_field() {
        let err = flags(&["--profile", "sleep", "--steps", "0"]).template().unwrap_err().to_string();
        assert!(err.contains("base.steps"), "{err}");
        let err = flags(&["--profile", "sleep", "--priority", "urgent"]).template().unwrap_err().to_string();
        assert!(err.contains("priority"), "{err}");
        let err = flags(&["--profile", "sleep", "--seeds", "0"]).template().unwrap_err().to_string();
        assert!(err.contains("--seeds"), "{err}");
        let err = flags(&["--profile", "sleep", "--hops", "0", "--solver", "heun"]).template().unwrap_err().to_string();
        assert!(err.contains("--solver"), "{err}");
        let template = flags(&["--profile", "sleep", "--hops", "0"]).template().unwrap();
        assert_eq!(template.spec.cfm, Some(pb::CfmSettings { hops: Some(0), ..Default::default() }));
        assert_eq!(template.hops, 0);
        assert!(Wrapper::try_parse_from(["t", "--image", "x.png", "--steps", "3"]).is_err(), "an image job has no base steps");
    }

    #[test]
    fn spec_file_is_parsed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        let good = r#"{"profile": "sleep", "seed": 5, "source": {"text": {"prompt": "a cat"}},
            "base": {"width": 64, "height": 64, "steps": 2, "scheduler": "ddim"},
            "cfm": {"hops": 1, "solver": "heun2", "steps": 3}}"#;
        std::fs::write(&path, good).unwrap();
        let template = flags(&["--spec", path.to_str().unwrap(), "--seeds", "2"]).template().unwrap();
        assert_eq!((template.first_seed, template.spec.cfm.as_ref().unwrap().solver.as_deref()), (5, Some("heun2")));
        assert_eq!(template.hops, 1);

        std::fs::write(&path, r#"{"profile": "sleep", "source": {"text": {"prompt": "x"}}, "colour": 1}"#).unwrap();
        let err = format!("{:#}", flags(&["--spec", path.to_str().unwrap()]).template().unwrap_err());
        assert!(err.contains("colour"), "{err}");

        std::fs::write(&path, r#"{"profile": "sleep", "source": {"text": {"prompt": "x"}}, "base": {"steps": 0}}"#).unwrap();
        let err = flags(&["--spec", path.to_str().unwrap()]).template().unwrap_err().to_string();
        assert!(err.contains("--spec") && err.contains("base.steps"), "{err}");
    }

    #[test]
    fn spec_file_excludes_spec_flags() {
        assert!(Wrapper::try_parse_from(["t", "--spec", "x.json", "--steps", "3"]).is_err());
    }
}

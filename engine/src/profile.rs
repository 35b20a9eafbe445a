//! Model profiles: which networks serve each stage, and where their weights are.
//!
//! A profile is a TOML file. Relative paths resolve against the file's directory. The built-in
//! profile `tiny` is the same format, embedded in the binary with its weights (see
//! [`crate::tiny`]), so the default needs no files at all.
//!
//! ```toml
//! name = "sd15"
//!
//! [base]                       # text → low-resolution latent
//! kind = "stable-diffusion"    # a diffusers SD 1.5 directory, or a single-file checkpoint:
//! path = "stable-diffusion-v1-5"   # "v1-5-pruned-emaonly.safetensors" (or .ckpt), with
//! # tokenizer = "clip-vit-large-patch14"  (a single file has none; or `config`'s tokenizer/)
//! # config = "tiny-sd-dir"      (single file of non-SD-1.5 sizes: a diffusers dir for them)
//! lora = "lcm-lora-sdv1-5/pytorch_lora_weights.safetensors"   # optional, fused at load
//! lora_scale = 1.0
//! variant = "fp16"             # optional: read `*.fp16.safetensors` (exactly that variant)
//!
//! [autoencoder]                # encode uploads, decode the last latent
//! kind = "diffusers"           # a diffusers `vae/` directory; or "ldm": one LDM-layout file
//! path = "stable-diffusion-v1-5/vae"   # (ldm: the single file itself, vae-ft-mse, a .ckpt)
//! variant = "fp16"             # optional, as in [base] (diffusers only)
//! tile = 64                    # tiled decoding (latent pixels)
//! overlap = 16
//! auto_tile_above = 96
//!
//! [[hops]]                     # CFM hops, in order; each its own weights
//! weights = "cfm/hop1.safetensors"
//! config = "cfm/hop1.json"     # the UNet config (JSON, reference field names)
//! upsample = "bilinear"        # bilinear | nearest | psu
//! noising_step = 400
//!
//! [capabilities]               # what jobs may ask for (the coordinator admits by it)
//! text_conditioning = true
//! schedulers = ["ddim", "euler_a", "lcm"]
//! hops = 1
//! latent_channels = 4
//! latent_multiple = 4          # what the hop UNets need (a worker that loads them says so)
//! ```
//!
//! `kind = "flow"` in `[base]` is an unconditional flow-matching generator (the CFM UNet
//! without context): `path` is its weights, `config` its UNet config and `latent_size` the
//! `[height, width]` latent it makes. The tiny profile uses it.

use std::path::{Path, PathBuf};

use fmboost_core::capabilities::Capabilities;
use fmboost_core::profile::{JobDefaults, ProfileInfo};
use fmboost_models::cfm::UpsampleMode;
use serde::Deserialize;

/// Why a profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile `{0}`: no such built-in profile and no such file (built-in: tiny, sleep)")]
    Unknown(String),
    #[error("profile file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("profile file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The `[base]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BaseSpec {
    /// SD 1.5: a diffusers-format directory, or a single-file checkpoint (CompVis / A1111
    /// layout, `.safetensors` or `.ckpt`); optionally with a LoRA fused in.
    StableDiffusion {
        path: PathBuf,
        #[serde(default)]
        lora: Option<PathBuf>,
        #[serde(default = "one")]
        lora_scale: f64,
        /// The weights variant (`fp16` → `*.fp16.safetensors`), as diffusers' `variant`.
        #[serde(default)]
        variant: Option<String>,
        /// Single file only: a diffusers SD directory describing its architecture (SD 1.5's
        /// built in otherwise).
        #[serde(default)]
        config: Option<PathBuf>,
        /// Single file only: the tokenizer folder (default: `config`'s `tokenizer/`).
        #[serde(default)]
        tokenizer: Option<PathBuf>,
    },
    /// An unconditional flow-matching latent generator.
    Flow { path: PathBuf, config: PathBuf, latent_size: [usize; 2] },
}

fn one() -> f64 {
    1.0
}

/// The `[autoencoder]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderSpec {
    pub kind: AutoencoderKind,
    pub path: PathBuf,
    /// The weights variant of a diffusers `vae/` (`fp16` → `*.fp16.safetensors`).
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub tile: Option<usize>,
    #[serde(default)]
    pub overlap: Option<usize>,
    #[serde(default)]
    pub auto_tile_above: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoencoderKind {
    /// A diffusers `vae/` directory (`config.json` + `diffusion_pytorch_model.safetensors`).
    Diffusers,
    /// One file in the LDM layout, safetensors or `.ckpt`: a `vae-ft-mse` file, a single-file
    /// SD checkpoint (its `first_stage_model.`), the paper's Lightning checkpoint (its
    /// `first_stage.`); `ddconfig` from the metadata or the tensors' shapes.
    Ldm,
}

/// One `[[hops]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HopSpec {
    pub weights: PathBuf,
    pub config: PathBuf,
    #[serde(default = "bilinear")]
    pub upsample: UpsampleMode,
    #[serde(default = "noising_step")]
    pub noising_step: usize,
}

fn bilinear() -> UpsampleMode {
    UpsampleMode::Bilinear
}
fn noising_step() -> usize {
    400
}

/// A parsed profile; paths are absolute (or, for the built-in profile, names of embedded files).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    pub name: String,
    pub base: BaseSpec,
    pub autoencoder: AutoencoderSpec,
    #[serde(default)]
    pub hops: Vec<HopSpec>,
    /// Job settings for fields a client leaves unset (read by the coordinator too).
    #[serde(default)]
    pub defaults: JobDefaults,
    /// What its models can run (read by the coordinator too; checked against the rest of
    /// the file here and against the networks when they load).
    pub capabilities: Capabilities,
}

impl ProfileSpec {
    /// Parses TOML; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid { path: origin.into(), message };
        // The serving plane's view first (name, defaults, capabilities), as the coordinator reads it.
        ProfileInfo::parse(text).map_err(invalid)?;
        let spec: ProfileSpec = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        crate::capabilities::check_spec(&spec).map_err(invalid)?;
        let base_variant = match &spec.base {
            BaseSpec::StableDiffusion { variant, .. } => variant.as_deref(),
            _ => None,
        };
        for (table, variant) in [("base", base_variant), ("autoencoder", spec.autoencoder.variant.as_deref())] {
            if let Some(v) = variant {
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(invalid(format!("[{table}] variant {v:?}: expected a name such as \"fp16\" (letters, digits, `_`, `-`)")));
                }
            }
        }
        if spec.autoencoder.variant.is_some() && spec.autoencoder.kind != AutoencoderKind::Diffusers {
            return Err(invalid("[autoencoder] variant applies to kind = \"diffusers\" only".into()));
        }
        Ok(spec)
    }

    /// Reads a profile file and resolves its relative paths against the file's directory.
    pub fn read(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io { path: path.into(), source })?;
        let mut spec = Self::parse(&text, path)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        spec.resolve_paths(&dir);
        Ok(spec)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        match &mut self.base {
            BaseSpec::StableDiffusion { path, lora, config, tokenizer, .. } => {
                resolve(path);
                for extra in [lora, config, tokenizer].into_iter().flatten() {
                    resolve(extra);
                }
            }
            BaseSpec::Flow { path, config, .. } => {
                resolve(path);
                resolve(config);
            }
        }
        resolve(&mut self.autoencoder.path);
        for hop in &mut self.hops {
            resolve(&mut hop.weights);
            resolve(&mut hop.config);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"
name = "sd15"
[base]
kind = "stable-diffusion"
path = "sd"
lora = "lcm.safetensors"
[autoencoder]
kind = "diffusers"
path = "sd/vae"
tile = 64
overlap = 16
[[hops]]
weights = "/abs/hop1.safetensors"
config = "hop1.json"
[defaults]
hops = 1
[capabilities]
text_conditioning = true
schedulers = ["ddim", "lcm"]
hops = 1
latent_channels = 4
latent_multiple = 4
"#;

    #[test]
    fn reads_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, SD15).unwrap();
        let spec = ProfileSpec::read(&file).unwrap();
        assert_eq!(spec.name, "sd15");
        match &spec.base {
            BaseSpec::StableDiffusion { path, lora, lora_scale, variant, config, tokenizer } => {
                assert_eq!(variant, &None);
                assert_eq!(path, &dir.path().join("sd"));
                assert_eq!((config, tokenizer), (&None, &None));
                assert_eq!(lora.as_deref(), Some(dir.path().join("lcm.safetensors").as_path()));
                assert_eq!(*lora_scale, 1.0);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(spec.hops[0].weights, PathBuf::from("/abs/hop1.safetensors"));
        assert_eq!(spec.hops[0].config, dir.path().join("hop1.json"));
        assert_eq!(spec.hops[0].upsample, UpsampleMode::Bilinear);
        assert_eq!(spec.hops[0].noising_step, 400);
    }

    #[test]
    fn reads_the_weights_variant_of_base_and_autoencoder() {
        let text = SD15.replace("lora = ", "variant = \"fp16\"\nlora = ").replace("tile = 64", "variant = \"fp16\"\ntile = 64");
        let spec = ProfileSpec::parse(&text, Path::new("x.toml")).unwrap();
        assert!(matches!(&spec.base, BaseSpec::StableDiffusion { variant: Some(v), .. } if v == "fp16"), "{:?}", spec.base);
        assert_eq!(spec.autoencoder.variant.as_deref(), Some("fp16"));
        let ldm = text.replace("kind = \"diffusers\"", "kind = \"ldm\"");
        let err = ProfileSpec::parse(&ldm, Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("[autoencoder] variant applies to kind = \"diffusers\" only"), "{err}");
    }

    #[test]
    fn single_file_config_and_tokenizer_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        let text = SD15.replace("path = \"sd\"", "path = \"sd.safetensors\"\nconfig = \"cfg\"\ntokenizer = \"/abs/tok\"");
        std::fs::write(&file, text).unwrap();
        match ProfileSpec::read(&file).unwrap().base {
            BaseSpec::StableDiffusion { path, config, tokenizer, .. } => {
                assert_eq!(path, dir.path().join("sd.safetensors"));
                assert_eq!(config, Some(dir.path().join("cfg")));
                assert_eq!(tokenizer, Some(PathBuf::from("/abs/tok")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_errors_naming_them() {
        let err = ProfileSpec::parse(&SD15.replace("tile = 64", "tyle = 64"), Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("tyle"), "{err}");
        let err = ProfileSpec::parse(&SD15.replace("stable-diffusion", "dall-e"), Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("dall-e"), "{err}");
        let err = ProfileSpec::parse(&SD15.replace("lora = ", "variant = \"../fp16\"\nlora = "), Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("[base] variant \"../fp16\""), "{err}");
        let err = ProfileSpec::read(Path::new("/nonexistent/profile.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/profile.toml"), "{err}");
    }

    #[test]
    fn capabilities_must_agree_with_the_rest_of_the_file() {
        let parse = |text: &str| ProfileSpec::parse(text, Path::new("x.toml")).map(|_| ()).map_err(|e| e.to_string());
        parse(SD15).unwrap();
        for (from, to, needle) in [
            ("hops = 1\nlatent", "hops = 2\nlatent", "[capabilities] hops = 2, but the profile has 1 [[hops]]"),
            (
                "hops = 1\n[capabilities]\ntext_conditioning = true",
                "hops = 1\nguidance = 1.0\n[capabilities]\ntext_conditioning = false",
                "text_conditioning = false, but a `stable-diffusion` base",
            ),
            ("\"lcm\"]", "\"euler\"]", "scheduler `euler`"),
        ] {
            let err = parse(&SD15.replace(from, to)).unwrap_err();
            assert!(err.contains(needle) && err.contains("x.toml"), "{needle:?} not in {err}");
        }
        let without = SD15.split("[capabilities]").next().unwrap();
        assert!(parse(without).unwrap_err().contains("no [capabilities] table"));
        let tiny = crate::registry::resolve_profile(crate::registry::TINY).unwrap().0;
        assert_eq!(tiny.capabilities.hops as usize, tiny.hops.len());
        let text = fmboost_core::profile::TINY_PROFILE_TOML;
        for (from, to, needle) in [
            ("text_conditioning = false", "text_conditioning = true", "a `flow` base is unconditional"),
            ("latent_size = [8, 8]", "latent_size = [8, 16]", "set base_sizes = [[128, 64]]"),
        ] {
            let err = parse(&text.replace(from, to)).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }
}

/// The profiles docs/models/sd15.md shows are profiles this parser takes: its first TOML block
/// whole, and with the single-file and the paper's-checkpoint blocks put in place of the tables
/// they show.
#[cfg(test)]
mod doc_examples {
    use super::*;

    const DOC: &str = include_str!("../../docs/models/sd15.md");

    fn blocks() -> Vec<toml::Table> {
        DOC.split("```toml\n")
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap())
            .map(|text| text.parse::<toml::Table>().unwrap_or_else(|e| panic!("{e}\n{text}")))
            .collect()
    }

    #[test]
    fn the_doc_profiles_parse() {
        let blocks = blocks();
        assert_eq!(blocks.len(), 3, "a whole profile, a single file, the paper's checkpoint");
        let parse = |table: &toml::Table| ProfileSpec::parse(&toml::to_string(table).unwrap(), Path::new("sd15.md")).unwrap_or_else(|e| panic!("{e}"));
        assert!(parse(&blocks[0]).capabilities.text_conditioning);
        let with = |part: &toml::Table| {
            let mut profile = blocks[0].clone();
            profile.extend(part.clone());
            parse(&profile)
        };
        assert!(matches!(with(&blocks[1]).base, BaseSpec::StableDiffusion { tokenizer: Some(_), .. }));
        let paper = with(&blocks[2]);
        assert_eq!(paper.hops[0].weights, paper.autoencoder.path, "hop and first stage from the one .ckpt");
    }
}

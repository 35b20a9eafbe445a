//! Model profiles over the SD directories of ../shared/fixtures (as users download them), with
//! one CFM hop, for the engine, CLI and cluster tests. Shared by `#[path]` so the three test
//! suites run the very same profiles.
//!
//! The hop is the paper's UNet of the golden file `cfm_unet_a.safetensors` (in 8 = 4 + 4
//! channels, out 4: the fixtures' latents), read in place (its `net.*` keys; the file's
//! input/output tensors are ignored); its config JSON is written next to the profile from the
//! file's own `config` metadata. Nothing is copied into the project and anyone with the golden
//! files rebuilds it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `$FMBOOST_GOLDEN_DIR`'s parent, else `<workspace>/../shared`. Panics (never skips) if missing.
pub fn shared_dir() -> PathBuf {
    let golden = std::env::var_os("FMBOOST_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"));
    let golden = golden.canonicalize().unwrap_or_else(|e| panic!("golden directory {} is missing: {e}", golden.display()));
    golden.parent().expect("golden has a parent").to_path_buf()
}

/// The two fixture directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixture {
    /// `sd15-tiny-diffusers`: f32, tokenizer as vocab.json + merges.txt.
    F32,
    /// `sd15-tiny-diffusers-fp16`: `*.fp16.safetensors`, tokenizer.json.
    Fp16,
}

impl Fixture {
    pub fn dir(self) -> PathBuf {
        let name = match self {
            Fixture::F32 => "sd15-tiny-diffusers",
            Fixture::Fp16 => "sd15-tiny-diffusers-fp16",
        };
        let dir = shared_dir().join("fixtures").join(name);
        assert!(dir.is_dir(), "fixture {} is missing", dir.display());
        dir
    }

    /// The profile's `name` (what a client puts in the job spec).
    pub fn profile_name(self) -> &'static str {
        match self {
            Fixture::F32 => "sd15-fixture",
            Fixture::Fp16 => "sd15-fixture-fp16",
        }
    }
}

/// The golden CFM UNet's config (the `config` entry of its safetensors metadata), as JSON text.
pub fn hop_config_json(weights: &Path) -> String {
    let bytes = std::fs::read(weights).unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).expect("a safetensors header");
    header["__metadata__"]["config"].as_str().expect("a `config` metadata entry").to_string()
}

/// Writes `<dir>/<name>.toml` (and the hop's `hop1.json`) for `fixture` with `model_dir` as the
/// SD directory (the fixture itself unless a test passes a broken copy); returns the profile.
pub fn write_profile_for(dir: &Path, fixture: Fixture, model_dir: &Path) -> PathBuf {
    let hop_weights = shared_dir().join("golden/cfm_unet_a.safetensors");
    std::fs::write(dir.join("hop1.json"), hop_config_json(&hop_weights)).unwrap();
    let variant = match fixture {
        Fixture::F32 => "",
        Fixture::Fp16 => "variant = \"fp16\"\n",
    };
    let text = format!(
        r#"name = "{name}"

[base]
kind = "stable-diffusion"
path = "{model}"
{variant}
[autoencoder]
kind = "diffusers"
path = "{model}/vae"
{variant}
[[hops]]
weights = "{hop}"
config = "hop1.json"
upsample = "bilinear"
noising_step = 400

[defaults]
width = 64
height = 64
steps = 4
scheduler = "ddim"
guidance = 7.5
hops = 1
cfm_solver = "euler"
cfm_steps = 3

# What admission lets through: prompts and guidance, SD's three schedulers, any multiple of
# 8 px; the hop UNet (two levels) takes any latent size entering hop 1.
[capabilities]
text_conditioning = true
schedulers = ["ddim", "euler_a", "lcm"]
hops = 1
latent_channels = 4
latent_multiple = 1
"#,
        name = fixture.profile_name(),
        model = model_dir.display(),
        hop = hop_weights.display(),
    );
    let path = dir.join(format!("{}.toml", fixture.profile_name()));
    std::fs::write(&path, text).unwrap();
    path
}

/// [`write_profile_for`] the fixture directory itself, unchanged.
pub fn write_profile(dir: &Path, fixture: Fixture) -> PathBuf {
    write_profile_for(dir, fixture, &fixture.dir())
}

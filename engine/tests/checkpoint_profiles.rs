//! Profiles pointed at checkpoint files as users hold them. The paper's Lightning `.ckpt` (no
//! conversion step): its CFM hop and its first-stage autoencoder both load from the one file,
//! and the hop computes what the same EMA weights give from safetensors. The single-file SD
//! forms refuse what cannot apply, naming it.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fmboost_engine::files::Files;
use fmboost_engine::profile::ProfileSpec;
use fmboost_engine::stack::{Needs, ProfileModels};
use fmboost_models::cfm::Solver;
use fmboost_models::progress;
use fmboost_models::tensor_file::TensorFile;

fn ckpt() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/data/paper_lightning_tiny.ckpt").canonicalize().unwrap()
}

fn load(dir: &Path, name: &str, hop_weights: &Path) -> ProfileModels {
    let config = TensorFile::open(&ckpt().with_file_name("paper_lightning_tiny.reference.safetensors")).unwrap().metadata()["cfm_config"].clone();
    std::fs::write(dir.join("hop.json"), config).unwrap();
    let profile = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\n[base]\nkind = \"flow\"\npath = \"unused.safetensors\"\nconfig = \"hop.json\"\nlatent_size = [4, 4]\n\
         [autoencoder]\nkind = \"ldm\"\npath = \"{}\"\n[[hops]]\nweights = \"{}\"\nconfig = \"hop.json\"\n\
         [defaults]\nwidth = 32\nheight = 32\nscheduler = \"euler\"\nguidance = 1.0\nhops = 1\n\
         [capabilities]\ntext_conditioning = false\nschedulers = [\"euler\"]\nbase_sizes = [[32, 32]]\nhops = 1\nlatent_channels = 4\nlatent_multiple = 1\n",
        ckpt().display(),
        hop_weights.display()
    );
    std::fs::write(&profile, text).unwrap();
    let spec = ProfileSpec::read(&profile).unwrap();
    let needs = Needs { base: false, autoencoder: true, hops: true };
    ProfileModels::load(spec, Files::Disk, needs, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn hops_and_autoencoder_load_from_the_lightning_ckpt() {
    let dir = tempfile::tempdir().unwrap();
    let ema = TensorFile::open(&ckpt()).unwrap().load_prefixed("ema_model.ema_model.net.").unwrap();
    let ema_file = dir.path().join("ema.safetensors");
    candle_core::safetensors::save(&ema, &ema_file).unwrap();

    let from_ckpt = load(dir.path(), "ckpt", &ckpt());
    let from_safetensors = load(dir.path(), "st", &ema_file);
    assert_eq!(from_ckpt.latent_channels(), Some(4));
    let z_lo = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &Device::Cpu).unwrap();
    let run = |m: &ProfileModels| {
        let z = m.hop(1, &z_lo, &[3], Solver::Euler, 2, &mut progress::ignore).unwrap();
        assert_eq!(z.dims(), &[1, 4, 8, 8]);
        z.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(run(&from_ckpt), run(&from_safetensors));
    let image = from_ckpt.decode(&z_lo, None, &mut progress::ignore).unwrap();
    assert_eq!(image.dims(), &[1, 3, 4, 4], "a one-level first stage decodes at the latent's size");
}

/// `[defaults]` and `[capabilities]` of an SD profile without hops.
const SD_NO_HOPS: &str = "[defaults]\nhops = 0\n[capabilities]\ntext_conditioning = true\nschedulers = [\"ddim\", \"euler_a\", \"lcm\"]\nhops = 0\nlatent_channels = 4\nlatent_multiple = 1\n";

fn base_error(dir: &Path, base: &str) -> String {
    let profile = dir.join("sd.toml");
    std::fs::write(&profile, format!("name = \"sd\"\n[base]\nkind = \"stable-diffusion\"\n{base}\n[autoencoder]\nkind = \"ldm\"\npath = \"x\"\n{SD_NO_HOPS}")).unwrap();
    let spec = ProfileSpec::read(&profile).unwrap();
    let needs = Needs { base: true, autoencoder: false, hops: false };
    match ProfileModels::load(spec, Files::Disk, needs, &Device::Cpu) {
        Ok(_) => panic!("loaded {base}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn single_file_options_on_a_directory_and_missing_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sd-dir")).unwrap();
    let err = base_error(dir.path(), "path = \"sd-dir\"\ntokenizer = \"tok\"");
    assert!(err.contains("`config` and `tokenizer` are for a single-file checkpoint") && err.contains("sd-dir"), "{err}");
    let err = base_error(dir.path(), "path = \"v1-5-pruned-emaonly.safetensors\"");
    assert!(err.contains("v1-5-pruned-emaonly.safetensors: no such file"), "{err}");
    std::fs::write(dir.path().join("one.safetensors"), b"not weights").unwrap();
    let err = base_error(dir.path(), "path = \"one.safetensors\"");
    assert!(err.contains("no tokenizer") && err.contains("`tokenizer`"), "{err}");
    let err = base_error(dir.path(), "path = \"one.safetensors\"\nvariant = \"fp16\"");
    assert!(err.contains("`variant = \"fp16\"`") && err.contains("one.safetensors is a single file"), "{err}");
}

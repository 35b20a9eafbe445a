//! Single-file SD 1.x checkpoints (CompVis / A1111 layout), made from the tiny diffusers
//! fixture with diffusers' own key mapping: the loader reads them back to the same networks
//! as the directory (same latents, bit for bit), and every key problem is one error.

mod single_file_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fmboost_models::autoencoder::Autoencoder;
use fmboost_models::base::single_file::SingleFileOptions;
use fmboost_models::base::{LoadOptions, SchedulerKind, StableDiffusion, TextToLatent};
use fmboost_models::progress;
use single_file_support as support;

/// The fixture as `config`; its `tokenizer/` is the default tokenizer.
fn options_with_config() -> SingleFileOptions {
    SingleFileOptions { config: Some(support::fixture()), tokenizer: None }
}

fn latents(sd: &StableDiffusion) -> Vec<f32> {
    let settings = TextToLatent { width: 64, height: 64, steps: 3, scheduler: SchedulerKind::Ddim, guidance: 7.5, negative_prompt: "blurry".into() };
    let z = sd.generate(&["a photo of a cat", "a red bicycle"], &[7, 8], &settings, &mut progress::ignore).unwrap();
    z.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn single_file_generates_the_latents_of_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("sd15-tiny.safetensors");
    support::write_single_file(&single);

    let options = LoadOptions::default();
    let from_file = StableDiffusion::load_single_file(&single, &options_with_config(), &options).unwrap();
    let from_dir = StableDiffusion::load(&support::fixture(), &options).unwrap();
    assert_eq!(from_file.scheduler_config(), from_dir.scheduler_config(), "the scheduler config comes from `config`");
    let prompts = ["a photo of a cat"];
    let (a, b) = (from_file.encode_prompts(&prompts).unwrap(), from_dir.encode_prompts(&prompts).unwrap());
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let z = latents(&from_file);
    assert!(z.iter().all(|v| v.is_finite()));
    assert_eq!(z, latents(&from_dir), "single file and directory give different latents");
}

#[test]
fn the_autoencoder_loads_from_the_same_file_and_from_a_vae_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("sd15-tiny.safetensors");
    let tensors = support::single_file_tensors();
    candle_core::safetensors::save(&tensors, &single).unwrap();
    // A vae-ft-mse-style file: the autoencoder's own LDM keys, no prefix, no metadata.
    let vae_only: HashMap<String, Tensor> =
        tensors.iter().filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|k| (k.to_string(), v.clone()))).collect();
    let vae_file = dir.path().join("vae-ft-mse-tiny.safetensors");
    candle_core::safetensors::save(&vae_only, &vae_file).unwrap();

    let reference = Autoencoder::load_diffusers_dir(&support::fixture().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let image = Tensor::randn(0f32, 0.5, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let expected_z = reference.encode(&image).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for path in [&single, &vae_file] {
        let ae = Autoencoder::load_ldm_file(path, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ae.config().block_out_channels, reference.config().block_out_channels, "{}", path.display());
        assert_eq!(ae.config().scaling_factor, 0.18215);
        let z = ae.encode(&image).unwrap();
        assert_eq!(z.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected_z, "{}", path.display());
        let decoded = ae.decode(&z).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(decoded, reference.decode(&z).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}

fn load_error(tensors: &HashMap<String, Tensor>, dir: &Path, single: &SingleFileOptions) -> String {
    let path = dir.join("broken.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    match StableDiffusion::load_single_file(&path, single, &LoadOptions::default()) {
        Ok(_) => panic!("loaded a broken checkpoint"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_unexpected_and_misshapen_keys_are_one_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = support::single_file_tensors();
    tensors.remove("model.diffusion_model.out.2.bias").unwrap();
    tensors.remove("cond_stage_model.transformer.text_model.final_layer_norm.weight").unwrap();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    tensors.insert("model.diffusion_model.input_blocks.9.0.in_layers.0.weight".into(), zeros(&[4]));
    tensors.insert("model.diffusion_model.time_embed.0.weight".into(), zeros(&[128, 31]));
    tensors.insert("lora_te_text_model_encoder.alpha".into(), zeros(&[1]));
    let err = load_error(&tensors, dir.path(), &options_with_config());
    for part in [
        "broken.safetensors",
        "1 keys of no SD 1.x part: lora_te_text_model_encoder.alpha",
        "1 UNet tensors missing (diffusers names): conv_out.bias",
        "1 unexpected UNet keys: model.diffusion_model.input_blocks.9.0.in_layers.0.weight",
        "model.diffusion_model.time_embed.0.weight (expected [128, 32], found [128, 31])",
        "1 text encoder tensors missing (diffusers names): text_model.final_layer_norm.weight",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
}

#[test]
fn without_config_the_sd15_architecture_is_expected() {
    // The tiny fixture is not SD 1.5-sized: with the built-in architecture every difference is
    // reported (not a crash, not a partial load).
    let dir = tempfile::tempdir().unwrap();
    let single = SingleFileOptions { config: None, tokenizer: Some(support::tokenizer_dir()) };
    let err = load_error(&support::single_file_tensors(), dir.path(), &single);
    assert!(err.contains("model.diffusion_model.input_blocks.0.0.weight (expected [320, 4, 3, 3], found [32, 4, 3, 3])"), "{err}");
    assert!(err.contains("UNet tensors missing"), "{err}");
    assert!(err.contains("(and "), "long lists are cut: {err}");
}

#[test]
fn an_unreadable_ckpt_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.ckpt");
    std::fs::write(&path, b"PK\x03\x04truncated").unwrap();
    let err = StableDiffusion::load_single_file(&path, &options_with_config(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("model.ckpt") && err.contains("PyTorch checkpoint"), "{err}");
}

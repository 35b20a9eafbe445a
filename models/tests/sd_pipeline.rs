//! Text-to-latent through the code users run: the tiny golden models written out as a
//! diffusers directory, loaded with `StableDiffusion::load`, and every documented error.

mod sd_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fmboost_models::autoencoder::Autoencoder;
use fmboost_models::base::{LoadOptions, SchedulerKind, StableDiffusion, TextToLatent};
use fmboost_models::progress::{self, Flow, RunError, Step};
use fmboost_models::weights::LoadError;

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    sd_support::write_tiny_sd_dir(dir.path());
    dir
}

fn load(dir: &Path) -> Result<StableDiffusion, LoadError> {
    StableDiffusion::load(dir, &LoadOptions::default())
}

fn settings(scheduler: SchedulerKind) -> TextToLatent {
    TextToLatent { width: 64, height: 48, steps: 3, scheduler, guidance: 7.5, negative_prompt: "w7 w8".into() }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn generates_deterministic_batches_with_every_scheduler() {
    let dir = tiny_dir();
    let sd = load(dir.path()).unwrap();
    for kind in [SchedulerKind::Ddim, SchedulerKind::EulerAncestral, SchedulerKind::Lcm] {
        let s = settings(kind);
        let batch = sd.generate(&["w1 w2 w3", "w4"], &[11, 12], &s, &mut progress::ignore).unwrap();
        let f = sd.latent_factor();
        assert_eq!(batch.dims(), &[2, 4, 48 / f, 64 / f], "{kind:?}");
        let again = sd.generate(&["w1 w2 w3", "w4"], &[11, 12], &s, &mut progress::ignore).unwrap();
        assert_eq!(max_diff(&batch, &again), 0.0, "{kind:?}: same seeds, different latents");
        // Each job's latents depend on its own seed only, not on its batch neighbours.
        let single = sd.generate(&["w4"], &[12], &s, &mut progress::ignore).unwrap();
        // Batched matmuls may round differently; Euler's latents are ~15× larger, hence relative.
        let scale = single.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let rel = max_diff(&batch.narrow(0, 1, 1).unwrap(), &single) / scale;
        assert!(rel < 1e-5, "{kind:?}: batch item differs from the single run by {rel:e} (relative)");
        let other_seed = sd.generate(&["w4"], &[13], &s, &mut progress::ignore).unwrap();
        assert!(max_diff(&other_seed, &single) > 1e-3, "{kind:?}: the seed has no effect");
        let sum = batch.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(sum.is_finite());
    }
}

#[test]
fn guidance_and_negative_prompt_change_the_result() {
    let dir = tiny_dir();
    let sd = load(dir.path()).unwrap();
    let with = sd.generate(&["w1"], &[5], &settings(SchedulerKind::Ddim), &mut progress::ignore).unwrap();
    let other_negative = TextToLatent { negative_prompt: "w9".into(), ..settings(SchedulerKind::Ddim) };
    let with_other = sd.generate(&["w1"], &[5], &other_negative, &mut progress::ignore).unwrap();
    let without = TextToLatent { guidance: 1.0, negative_prompt: String::new(), ..settings(SchedulerKind::Ddim) };
    let without = sd.generate(&["w1"], &[5], &without, &mut progress::ignore).unwrap();
    assert!(max_diff(&with, &with_other) > 1e-4);
    assert!(max_diff(&with, &without) > 1e-4);
}

#[test]
fn progress_reports_every_step_and_can_stop() {
    let dir = tiny_dir();
    let sd = load(dir.path()).unwrap();
    let mut seen = Vec::new();
    let mut stop_at_two = |s: Step| {
        seen.push(s.step);
        if s.step == 2 { Flow::Stop } else { Flow::Continue }
    };
    let err = sd.generate(&["w1"], &[1], &settings(SchedulerKind::Ddim), &mut stop_at_two).unwrap_err();
    assert!(matches!(err, RunError::Cancelled { step: 2, total: 3 }), "{err}");
    assert_eq!(seen, vec![1, 2]);
}

#[test]
fn bad_requests_are_clear_errors() {
    let dir = tiny_dir();
    let sd = load(dir.path()).unwrap();
    let run = |s: TextToLatent, prompts: &[&str], seeds: &[u64]| sd.generate(prompts, seeds, &s, &mut progress::ignore).unwrap_err().to_string();
    let base = settings(SchedulerKind::Ddim);
    // The tiny VAE downsamples by 4 (SD 1.5's by 8): sizes must be multiples of that.
    assert_eq!(sd.latent_factor(), 4);
    assert!(run(TextToLatent { width: 62, ..base.clone() }, &["w1"], &[1]).contains("width 62 must be a positive multiple of 4 px"));
    assert!(run(TextToLatent { height: 0, ..base.clone() }, &["w1"], &[1]).contains("height 0"));
    assert!(run(TextToLatent { steps: 0, ..base.clone() }, &["w1"], &[1]).contains("steps"));
    assert!(run(TextToLatent { guidance: 1.0, ..base.clone() }, &["w1"], &[1]).contains("negative_prompt"));
    assert!(run(base.clone(), &["w1", "w2"], &[1]).contains("2 prompts but 1 seeds"));
    assert!(run(TextToLatent { steps: 60, scheduler: SchedulerKind::Lcm, ..base }, &["w1"], &[1]).contains("original_inference_steps"));
}

/// Over-long prompts are truncated to 77 tokens (start + 75 + end) with a warning, as diffusers
/// does; generation still runs.
#[test]
fn over_long_prompt_is_truncated_keeping_the_end_token() {
    let dir = tiny_dir();
    let sd = load(dir.path()).unwrap();
    let words: Vec<String> = (1..=100).map(|i| format!("w{i}")).collect();
    let prompt = words.join(" ");
    let tokens = sd.tokenizer().tokenize(&prompt).unwrap();
    assert_eq!(tokens.ids.len(), 77);
    assert_eq!(tokens.truncated, 102 - 77);
    assert_eq!(tokens.ids[75], 75, "the 75th word is kept");
    assert_eq!(tokens.ids[76], 999, "the end token closes the truncated prompt");
    let short = sd.tokenizer().tokenize("w1 w2").unwrap();
    assert_eq!(short.truncated, 0);
    assert_eq!(&short.ids[..4], &[998, 1, 2, 999]);
    assert!(short.ids[4..].iter().all(|&id| id == 999), "padded with the end token");
    sd.generate(&[prompt.as_str()], &[1], &settings(SchedulerKind::Ddim), &mut progress::ignore).unwrap();
}

#[test]
fn reads_the_scheduler_config_of_the_directory() {
    let dir = tiny_dir();
    let sd = load(dir.path()).unwrap();
    assert_eq!(sd.scheduler_config().set_alpha_to_one, Some(false));
    assert_eq!(sd.scheduler_config().steps_offset, 1);
    std::fs::write(dir.path().join("scheduler/scheduler_config.json"), r#"{"beta_schedule": "cubic"}"#).unwrap();
    let sd = load(dir.path()).unwrap();
    let err = sd.generate(&["w1"], &[1], &settings(SchedulerKind::Ddim), &mut progress::ignore).unwrap_err().to_string();
    assert!(err.contains("beta_schedule `cubic`"), "{err}");
}

#[test]
fn missing_files_are_named_together() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer/tokenizer.json")).unwrap();
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("tokenizer/tokenizer.json"), "{err}");
    let err = load(&dir.path().join("nowhere")).err().unwrap().to_string();
    assert!(err.contains("nowhere"), "{err}");
    std::fs::remove_file(dir.path().join("vae/config.json")).unwrap();
    let err = Autoencoder::load_diffusers_dir(&dir.path().join("vae"), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}

fn rewrite_unet(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_keys_and_wrong_shapes_are_named_together() {
    let dir = tiny_dir();
    rewrite_unet(dir.path(), |t| {
        t.remove("conv_in.bias").unwrap();
        t.remove("mid_block.resnets.0.conv1.weight").unwrap();
        t.insert("conv_out.bias".into(), Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap());
    });
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("missing key `conv_in.bias`"), "{err}");
    assert!(err.contains("missing key `mid_block.resnets.0.conv1.weight`"), "{err}");
    assert!(err.contains("`conv_out.bias` has shape [5], expected [4]"), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn fp16_variant_loads() {
    let dir = tiny_dir();
    let f32_latents = load(dir.path()).unwrap().generate(&["w1"], &[3], &settings(SchedulerKind::Ddim), &mut progress::ignore).unwrap();
    let path = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let half: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    std::fs::remove_file(&path).unwrap();
    candle_core::safetensors::save(&half, dir.path().join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    // As diffusers: the variant must be asked for, and then applies where it exists (the text
    // encoder here has plain files only).
    let err = load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("set variant = \"fp16\""), "{err}");
    let options = LoadOptions { variant: Some("fp16".into()), ..Default::default() };
    let latents = StableDiffusion::load(dir.path(), &options).unwrap().generate(&["w1"], &[3], &settings(SchedulerKind::Ddim), &mut progress::ignore).unwrap();
    let rel = max_diff(&latents, &f32_latents) / f32_latents.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(rel < 2e-2, "fp16 weights (run in f32) drift {rel}");
}

#[test]
fn vae_directory_decodes_like_the_reference() {
    let dir = tiny_dir();
    let vae = Autoencoder::load_diffusers_dir(&dir.path().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let file = sd_support::golden("sd_vae_tiny.safetensors");
    let decoded = vae.decode_unscaled(file.tensor("output.latent_mean").unwrap()).unwrap();
    let err = fmboost_models::golden::rel_err(&decoded, file.tensor("output.decoded").unwrap()).unwrap();
    assert!(err < 1e-4, "{err}");
    assert_eq!(vae.config().scaling_factor, 0.18215);
}

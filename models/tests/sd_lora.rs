//! LoRA fusion: fused weights equal the merge computed by hand (kohya and PEFT naming), and a
//! model loaded with a LoRA generates exactly what a model with hand-merged weights does.

mod sd_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fmboost_models::base::{lora, LoadOptions, LoraSpec, SchedulerKind, StableDiffusion, TextToLatent};
use fmboost_models::progress;

const LINEAR: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const CONV: &str = "down_blocks.0.attentions.0.proj_in";
const RANK: usize = 2;
const ALPHA: f64 = 1.0;
const SCALE: f64 = 0.8;

fn unet_weights() -> HashMap<String, Tensor> {
    let file = sd_support::golden("sd_unet_tiny.safetensors");
    file.tensors.iter().filter_map(|(k, v)| k.strip_prefix("unet.").map(|k| (k.to_string(), v.clone()))).collect()
}

/// (down, up) for `module`: down [r, in(,1,1)], up [out, r(,1,1)], seeded values.
fn factors(weights: &HashMap<String, Tensor>, module: &str, seed: u64) -> (Tensor, Tensor) {
    let w = &weights[&format!("{module}.weight")];
    let (out, inp) = (w.dim(0).unwrap(), w.dim(1).unwrap());
    let mut rng = fmboost_models::rng::rng_for(seed, fmboost_models::rng::Stream::Train);
    let mut down_shape = vec![RANK, inp];
    let mut up_shape = vec![out, RANK];
    if w.rank() == 4 {
        down_shape.extend([1, 1]);
        up_shape.extend([1, 1]);
    }
    (rng.randn(&down_shape, &Device::Cpu).unwrap(), rng.randn(&up_shape, &Device::Cpu).unwrap())
}

fn kohya(weights: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (i, module) in [LINEAR, CONV].iter().enumerate() {
        let (down, up) = factors(weights, module, i as u64);
        let flat = format!("lora_unet_{}", module.replace('.', "_"));
        out.insert(format!("{flat}.lora_down.weight"), down);
        out.insert(format!("{flat}.lora_up.weight"), up);
        out.insert(format!("{flat}.alpha"), Tensor::new(ALPHA as f32, &Device::Cpu).unwrap());
    }
    out
}

fn peft(weights: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (i, module) in [LINEAR, CONV].iter().enumerate() {
        let (down, up) = factors(weights, module, i as u64);
        out.insert(format!("unet.{module}.lora_A.weight"), down);
        out.insert(format!("unet.{module}.lora_B.weight"), up);
        out.insert(format!("unet.{module}.alpha"), Tensor::new(ALPHA as f32, &Device::Cpu).unwrap());
    }
    out
}

/// W + scale·alpha/rank·Σ_k up[o,k]·down[k,i], element by element.
fn merged_by_hand(weights: &HashMap<String, Tensor>, module: &str, seed: u64) -> Vec<f32> {
    let w = weights[&format!("{module}.weight")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (down, up) = factors(weights, module, seed);
    let inp = down.elem_count() / RANK;
    let out = up.elem_count() / RANK;
    let down = down.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let up = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let factor = (SCALE * ALPHA / RANK as f64) as f32;
    let mut merged = w.clone();
    for o in 0..out {
        for i in 0..inp {
            let delta: f32 = (0..RANK).map(|k| up[o * RANK + k] * down[k * inp + i]).sum();
            merged[o * inp + i] += factor * delta;
        }
    }
    merged
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "{what}: off by {worst}");
}

#[test]
fn fusing_equals_merging_by_hand_in_both_namings() {
    let base = unet_weights();
    for (name, adapter) in [("kohya", kohya(&base)), ("peft", peft(&base))] {
        let mut fused = base.clone();
        assert_eq!(lora::fuse(&mut fused, &adapter, SCALE, name).unwrap(), 2);
        for (seed, module) in [LINEAR, CONV].iter().enumerate() {
            let ours = fused[&format!("{module}.weight")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&ours, &merged_by_hand(&base, module, seed as u64), &format!("{name} {module}"));
        }
        let untouched = "conv_in.weight";
        assert_eq!(
            fused[untouched].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            base[untouched].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn unknown_or_incomplete_lora_keys_are_named() {
    let base = unet_weights();
    let mut adapter = kohya(&base);
    adapter.insert("lora_unet_no_such_layer.lora_down.weight".into(), Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap());
    adapter.remove(&format!("lora_unet_{}.lora_up.weight", CONV.replace('.', "_")));
    let err = lora::fuse(&mut base.clone(), &adapter, 1.0, "adapter.safetensors").unwrap_err().to_string();
    assert!(err.contains("lora_unet_no_such_layer"), "{err}");
    assert!(err.contains(&format!("LoRA for `{CONV}` lacks its up matrix")), "{err}");
}

fn generate(dir: &Path, loras: Vec<LoraSpec>) -> Tensor {
    let sd = StableDiffusion::load(dir, &LoadOptions { loras, ..Default::default() }).unwrap();
    let settings = TextToLatent { width: 64, height: 64, steps: 2, scheduler: SchedulerKind::Lcm, guidance: 1.0, negative_prompt: String::new() };
    sd.generate(&["w1 w2"], &[4], &settings, &mut progress::ignore).unwrap()
}

#[test]
fn loading_with_a_lora_equals_hand_merged_weights() {
    let base = unet_weights();
    let with_lora = tempfile::tempdir().unwrap();
    sd_support::write_tiny_sd_dir(with_lora.path());
    let lora_path = with_lora.path().join("lcm_lora.safetensors");
    candle_core::safetensors::save(&kohya(&base), &lora_path).unwrap();
    let fused = generate(with_lora.path(), vec![LoraSpec { path: lora_path, scale: SCALE }]);

    let merged = tempfile::tempdir().unwrap();
    sd_support::write_tiny_sd_dir(merged.path());
    let mut weights = base.clone();
    for (seed, module) in [LINEAR, CONV].iter().enumerate() {
        let key = format!("{module}.weight");
        let shape = weights[&key].shape().clone();
        weights.insert(key, Tensor::from_vec(merged_by_hand(&base, module, seed as u64), shape, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&weights, merged.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let by_hand = generate(merged.path(), vec![]);
    let plain = generate(with_lora.path(), vec![]);

    let diff = (&fused - &by_hand).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "LoRA-loaded and hand-merged models differ by {diff}");
    let effect = (&fused - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(effect > 1e-4, "the LoRA had no effect");
}

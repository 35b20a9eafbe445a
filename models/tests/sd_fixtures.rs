//! SD directories as users download them (../shared/fixtures, saved by diffusers and
//! transformers 5): both layouts load unchanged, fp16 weights load into the f32 and bf16 run
//! dtypes exactly, the text encoder's keys with or without `text_model.`, the `variant` rule,
//! PyTorch `.bin` weights, and broken copies give errors naming the file and the key.

mod sd_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fmboost_models::autoencoder::Autoencoder;
use fmboost_models::base::{ClipConfig, LoadOptions, PromptTokenizer, SchedulerKind, StableDiffusion, TextEncoder, TextToLatent};
use fmboost_models::progress;
use fmboost_models::weights::{self, find_weights, WeightNames};

fn f32_dir() -> PathBuf {
    sd_support::fixture("sd15-tiny-diffusers")
}

fn fp16_dir() -> PathBuf {
    sd_support::fixture("sd15-tiny-diffusers-fp16")
}

fn options(variant: Option<&str>, dtype: DType) -> LoadOptions {
    LoadOptions { variant: variant.map(str::to_string), dtype, ..Default::default() }
}

fn settings() -> TextToLatent {
    TextToLatent { width: 64, height: 64, steps: 3, scheduler: SchedulerKind::Ddim, guidance: 7.5, negative_prompt: String::new() }
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    diff / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
}

/// A copy of a fixture directory (only what the loader reads) to break.
fn copy_of(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(sub).join(entry.file_name())).unwrap();
        }
    }
    dir
}

fn load_err(dir: &Path, options: &LoadOptions) -> String {
    StableDiffusion::load(dir, options).err().expect("loading must fail").to_string()
}

#[test]
fn both_fixture_layouts_load_unchanged_and_generate_alike() {
    let f32_sd = StableDiffusion::load(&f32_dir(), &options(None, DType::F32)).unwrap();
    let fp16_sd = StableDiffusion::load(&fp16_dir(), &options(Some("fp16"), DType::F32)).unwrap();
    assert!(f32_sd.tokenizer().source().to_string().ends_with("merges.txt"));
    assert!(fp16_sd.tokenizer().source().to_string().ends_with("tokenizer.json"));
    let prompts = ["a photo of a cat"];
    let a = f32_sd.generate(&prompts, &[7], &settings(), &mut progress::ignore).unwrap();
    let b = fp16_sd.generate(&prompts, &[7], &settings(), &mut progress::ignore).unwrap();
    assert_eq!(a.dims(), &[1, 4, 8, 8]);
    // The same pipeline, its weights rounded to fp16: close, not equal.
    let rel = rel_diff(&b, &a);
    assert!(rel > 0.0 && rel < 1e-2, "fp16 weights drift {rel}");
    // The prompt matters.
    let c = f32_sd.generate(&["a photo of a dog"], &[7], &settings(), &mut progress::ignore).unwrap();
    assert!(rel_diff(&c, &a) > 1e-3);
}

fn text_tensors(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    weights::read_weights(&dir.join("text_encoder").join(file)).unwrap()
}

fn clip_config(dir: &Path) -> ClipConfig {
    weights::read_json(&dir.join("text_encoder/config.json")).unwrap()
}

fn encode(tensors: &HashMap<String, Tensor>, dtype: DType) -> Tensor {
    let encoder = TextEncoder::build(&clip_config(&f32_dir()), tensors, "test", dtype, &Device::Cpu).unwrap();
    let tokenizer = PromptTokenizer::from_dir(&f32_dir(), Some(77)).unwrap();
    let ids = tokenizer.batch(&["a photo of a cat", ""], &Device::Cpu).unwrap();
    encoder.forward(&ids).unwrap()
}

/// The fp16 fixture is the f32 one rounded to fp16: loading it into f32 must equal rounding the
/// f32 weights ourselves, bit for bit; into bf16 it stays within bf16's precision.
#[test]
fn fp16_weights_load_exactly_into_f32_and_bf16() {
    let full = text_tensors(&f32_dir(), "model.safetensors");
    let half = text_tensors(&fp16_dir(), "model.fp16.safetensors");
    assert!(half.values().all(|t| t.dtype() == DType::F16));
    let rounded: HashMap<String, Tensor> = full.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap())).collect();
    let from_file = encode(&half, DType::F32);
    assert_eq!(from_file.dtype(), DType::F32);
    assert_eq!(rel_diff(&from_file, &encode(&rounded, DType::F32)), 0.0, "fp16 file → f32 differs from rounding ourselves");
    let bf16 = encode(&half, DType::BF16);
    assert_eq!(bf16.dtype(), DType::BF16);
    let rel = rel_diff(&bf16, &encode(&full, DType::F32));
    assert!(rel < 3e-2, "bf16 run drifts {rel} from f32");
}

#[test]
fn text_encoder_keys_load_with_or_without_the_text_model_prefix() {
    let bare = text_tensors(&f32_dir(), "model.safetensors");
    assert!(bare.keys().all(|k| !k.starts_with("text_model.")), "the fixture is transformers 5's bare layout");
    let prefixed: HashMap<String, Tensor> = bare.iter().map(|(k, v)| (format!("text_model.{k}"), v.clone())).collect();
    let single_file: HashMap<String, Tensor> =
        bare.iter().map(|(k, v)| (format!("cond_stage_model.transformer.text_model.{k}"), v.clone())).collect();
    let reference = encode(&bare, DType::F32);
    assert_eq!(rel_diff(&encode(&prefixed, DType::F32), &reference), 0.0);
    assert_eq!(rel_diff(&encode(&single_file, DType::F32), &reference), 0.0);
}

#[test]
fn the_variant_is_read_exactly_as_diffusers_reads_it() {
    // No variant asked, only fp16 files there: an error saying which setting loads them.
    let e = load_err(&fp16_dir(), &options(None, DType::F32));
    assert!(e.contains("unet/diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.fp16.safetensors (set variant = \"fp16\")"), "{e}");
    assert!(e.contains("model.fp16.safetensors (set variant = \"fp16\")"), "{e}");
    // A variant the folder does not have: no silent fallback to the full-precision files.
    let e = load_err(&f32_dir(), &options(Some("fp16"), DType::F32));
    assert!(e.contains("unet/diffusion_pytorch_model.fp16.safetensors (or diffusion_pytorch_model.fp16.bin) for variant \"fp16\""), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors (remove `variant`)"), "{e}");
    let e = Autoencoder::load_diffusers_variant(&fp16_dir().join("vae"), None, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("set variant = \"fp16\""), "{e}");
    Autoencoder::load_diffusers_variant(&fp16_dir().join("vae"), Some("fp16"), DType::F32, &Device::Cpu).unwrap();

    // Both present: each setting takes its own file.
    let both = tempfile::tempdir().unwrap();
    for name in ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.ema.bin"] {
        std::fs::write(both.path().join(name), b"").unwrap();
    }
    let pick = |v: Option<&str>| find_weights(both.path(), WeightNames::DIFFUSERS, v).map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
    assert_eq!(pick(None).unwrap(), "diffusion_pytorch_model.safetensors");
    assert_eq!(pick(Some("fp16")).unwrap(), "diffusion_pytorch_model.fp16.safetensors");
    assert_eq!(pick(Some("ema")).unwrap(), "diffusion_pytorch_model.ema.bin", "the PyTorch pickle when no safetensors");
    let e = pick(Some("bf16")).unwrap_err();
    assert!(e.contains("diffusion_pytorch_model.fp16.safetensors (set variant = \"fp16\")") && e.contains("(remove `variant`)"), "{e}");
    // transformers' names for the text encoder.
    let text = tempfile::tempdir().unwrap();
    std::fs::write(text.path().join("pytorch_model.bin"), b"").unwrap();
    assert_eq!(find_weights(text.path(), WeightNames::TRANSFORMERS, None).unwrap(), text.path().join("pytorch_model.bin"));
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// `pytorch_tensors.bin` is written by scripts/make-pickle-testdata.py (torch.save); candle's
/// unpickler reads it without running code from it.
#[test]
fn pytorch_bin_files_are_read_without_executing_code() {
    let tensors = weights::read_weights(&data("pytorch_tensors.bin")).unwrap();
    let get = |k: &str| tensors.get(k).unwrap_or_else(|| panic!("no `{k}` in {:?}", tensors.keys().collect::<Vec<_>>()));
    assert_eq!(get("f32").dims(), &[2, 3]);
    assert_eq!(values(get("f32")), [0., 1., 2., 3., 4., 5.]);
    assert_eq!(get("f16").dtype(), DType::F16);
    assert_eq!(values(get("f16")), [0., 0.5, 1., 1.5]);
    assert_eq!(get("bf16").dtype(), DType::BF16);
    assert_eq!(values(get("bf16")), [0., 0.25, 0.5, 0.75]);
    assert_eq!(get("i64").to_vec1::<i64>().unwrap(), [0, 1, 2, 3, 4]);
    assert_eq!(values(get("view")), [4., 5., 6., 7.], "a view at a storage offset");
    assert_eq!(get("transposed").dims(), &[3, 2]);
    assert_eq!(values(get("transposed")), [0., 3., 1., 4., 2., 5.], "a column-major tensor");

    // Not a zip pickle (torch < 1.6, or not PyTorch): refused with the conversion command.
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("pytorch_model.bin");
    std::fs::write(&legacy, b"\x80\x02legacy pickle").unwrap();
    let e = weights::read_weights(&legacy).unwrap_err().to_string();
    assert!(e.contains("pytorch_model.bin") && e.contains("not a zip-format PyTorch file"), "{e}");
    assert!(e.contains("st.save_file(") && e.contains("model.safetensors"), "{e}");
}

/// A directory whose text encoder is a PyTorch `.bin` is read from it: here one that lacks the
/// encoder's tensors, so the error lists them and names the `.bin`.
#[test]
fn a_bin_text_encoder_is_read_and_its_missing_keys_named() {
    let dir = copy_of(&f32_dir());
    std::fs::remove_file(dir.path().join("text_encoder/model.safetensors")).unwrap();
    std::fs::copy(data("pytorch_tensors.bin"), dir.path().join("text_encoder/pytorch_model.bin")).unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("text_encoder/pytorch_model.bin"), "{e}");
    assert!(e.contains("missing key `embeddings.token_embedding.weight`"), "{e}");
}

#[test]
fn broken_copies_name_the_file_and_the_key() {
    // A tensor removed from the text encoder, another given the wrong shape in the UNet.
    let dir = copy_of(&f32_dir());
    let text = dir.path().join("text_encoder/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&text, &Device::Cpu).unwrap();
    tensors.remove("encoder.layers.1.mlp.fc2.weight").unwrap();
    candle_core::safetensors::save(&tensors, &text).unwrap();
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&unet, &Device::Cpu).unwrap();
    tensors.insert("conv_in.bias".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &unet).unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("text_encoder/model.safetensors") && e.contains("missing key `encoder.layers.1.mlp.fc2.weight`"), "{e}");
    std::fs::copy(f32_dir().join("text_encoder/model.safetensors"), &text).unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("unet/diffusion_pytorch_model.safetensors") && e.contains("`conv_in.bias` has shape [3], expected [32]"), "{e}");

    // Missing files are named together.
    let dir = copy_of(&f32_dir());
    std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).unwrap();
    std::fs::remove_file(dir.path().join("text_encoder/config.json")).unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("tokenizer/merges.txt") && e.contains("text_encoder/config.json"), "{e}");

    // A truncated weights file, a config that is not JSON.
    let dir = copy_of(&f32_dir());
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("unet/diffusion_pytorch_model.safetensors") && e.contains("not a usable safetensors file"), "{e}");
    let dir = copy_of(&f32_dir());
    std::fs::write(dir.path().join("unet/config.json"), "{\"in_channels\": ").unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("unet/config.json"), "{e}");
}

/// A sharded text encoder (`model.safetensors.index.json` + shards, as transformers saves
/// large models) loads the same tensors as the single file.
#[test]
fn sharded_safetensors_load_like_the_single_file() {
    let dir = copy_of(&f32_dir());
    let text = dir.path().join("text_encoder");
    let single = text_tensors(&f32_dir(), "model.safetensors");
    std::fs::remove_file(text.join("model.safetensors")).unwrap();
    let mut keys: Vec<&String> = single.keys().collect();
    keys.sort();
    let (first, second) = keys.split_at(keys.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: HashMap<String, Tensor> = part.iter().map(|k| ((*k).clone(), single[*k].clone())).collect();
        candle_core::safetensors::save(&tensors, text.join(shard)).unwrap();
        for k in part {
            weight_map.insert((*k).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(text.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let path = find_weights(&text, WeightNames::TRANSFORMERS, None).unwrap();
    assert!(path.ends_with("model.safetensors.index.json"), "{}", path.display());
    let sharded = weights::read_weights(&path).unwrap();
    assert_eq!(rel_diff(&encode(&sharded, DType::F32), &encode(&single, DType::F32)), 0.0);
    StableDiffusion::load(dir.path(), &options(None, DType::F32)).unwrap();
    // A shard the index names but the folder lacks: named.
    std::fs::remove_file(text.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(dir.path(), &options(None, DType::F32));
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

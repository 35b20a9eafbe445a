//! The paper's own Lightning checkpoints, loaded directly: a tiny `.ckpt` in the reference
//! trainer's layout (made by scripts/make_paper_ckpts.py with torch.save) reads, through
//! candle's pickle reader, to exactly the tensors torch saved; the CFM hop takes the EMA
//! weights and the first-stage autoencoder its `first_stage.` keys, each the same network as
//! the safetensors path gives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fmboost_models::autoencoder::Autoencoder;
use fmboost_models::cfm::{self, UNetConfig, WeightSource};
use fmboost_models::tensor_file::TensorFile;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    cfm_config: UNetConfig,
    ddconfig: String,
}

/// The expected state dict, rebuilt from the plain-safetensors reference (no pickle involved).
fn reference() -> Reference {
    let path = data("paper_lightning_tiny.reference.safetensors");
    let file = TensorFile::open(&path).unwrap();
    let storage = file.load("storage").unwrap();
    let metadata = file.metadata();
    let layout: HashMap<String, (usize, Vec<usize>)> = serde_json::from_str(&metadata["layout"]).unwrap();
    let tensors = layout
        .into_iter()
        .map(|(key, (offset, shape))| {
            let numel = shape.iter().product::<usize>();
            (key, storage.narrow(0, offset, numel).unwrap().reshape(shape).unwrap())
        })
        .collect();
    Reference { tensors, cfm_config: UNetConfig::from_json(&metadata["cfm_config"]).unwrap(), ddconfig: metadata["ddconfig"].clone() }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn under(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect()
}

#[test]
fn the_pickle_reads_to_the_tensors_torch_saved() {
    let reference = reference();
    let file = TensorFile::open(&data("paper_lightning_tiny.ckpt")).unwrap();
    for (key, expected) in &reference.tensors {
        let got = file.load(key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.dtype(), DType::F16, "{key}");
        assert_eq!(got.dims(), expected.dims(), "{key}");
        assert_eq!(values(&got), values(expected), "{key}");
    }
    // Besides the weights, only the EMA's step counter (its bool `initted` is not a weight).
    let others: Vec<&String> = file.shapes().keys().filter(|k| !reference.tensors.contains_key(*k)).collect();
    assert_eq!(others, vec!["ema_model.step"]);
}

#[test]
fn a_cfm_hop_loads_the_ema_weights_of_the_ckpt() {
    let reference = reference();
    let config = &reference.cfm_config;
    let (from_ckpt, report) = cfm::load_unet_file(data("paper_lightning_tiny.ckpt"), config, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(report.prefix, "ema_model.ema_model.net.");
    assert_eq!(report.skipped_prefixes, vec!["model.net.".to_string()]);

    let dir = tempfile::tempdir().unwrap();
    let ema = dir.path().join("ema.safetensors");
    candle_core::safetensors::save(&under(&reference.tensors, "ema_model.ema_model.net."), &ema).unwrap();
    let (from_safetensors, _) = cfm::load_unet_file(&ema, config, &Device::Cpu, DType::F32).unwrap();
    let online = under(&reference.tensors, "model.net.");
    let (from_online, _) = cfm::load_unet(WeightSource::Tensors(&online), config, &Device::Cpu, DType::F32).unwrap();

    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.2f32, 0.7], &Device::Cpu).unwrap();
    let run = |unet: &cfm::EfficientUNet| values(&unet.forward(&x, &t, Some(&x)).unwrap());
    let v = run(&from_ckpt);
    assert_eq!(v, run(&from_safetensors), "ckpt and safetensors give different networks");
    assert_ne!(v, run(&from_online), "the online weights were loaded, not the EMA ones");
}

#[test]
fn the_first_stage_autoencoder_loads_from_the_ckpt() {
    let reference = reference();
    let from_ckpt = Autoencoder::load_ldm_file(&data("paper_lightning_tiny.ckpt"), DType::F32, &Device::Cpu).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("first_stage.safetensors");
    let metadata = HashMap::from([("ddconfig".to_string(), reference.ddconfig.clone())]);
    safetensors::serialize_to_file(&under(&reference.tensors, "first_stage."), Some(metadata), &path).unwrap();
    let from_safetensors = Autoencoder::load_ldm_file(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(from_ckpt.config(), from_safetensors.config(), "the ddconfig read off the shapes is the one saved");

    let image = Tensor::randn(0f32, 0.5, (1, 3, 16, 16), &Device::Cpu).unwrap();
    let z = from_ckpt.encode(&image).unwrap();
    assert_eq!(values(&z), values(&from_safetensors.encode(&image).unwrap()));
    assert_eq!(values(&from_ckpt.decode(&z).unwrap()), values(&from_safetensors.decode(&z).unwrap()));
}

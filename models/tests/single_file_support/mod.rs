//! Builds a single-file SD 1.x checkpoint from `../shared/fixtures/sd15-tiny-diffusers` with
//! the key mapping diffusers' `from_single_file` used (`tests/data/sd15_tiny_single_file_keys.json`,
//! written and checked by scripts/sd15_single_file.py), so the loader under test is checked
//! against diffusers, not against its own inverse. Shared by the models and CLI tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub const MAPPING: &str = include_str!("../data/sd15_tiny_single_file_keys.json");

/// `$FMBOOST_GOLDEN_DIR/../fixtures`, else `<workspace>/../shared/fixtures` (as the other SD
/// tests find them). Panics (never skips) if missing.
pub fn fixtures_dir() -> PathBuf {
    let golden = std::env::var_os("FMBOOST_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"));
    let dir = golden.join("../fixtures");
    dir.canonicalize().unwrap_or_else(|e| panic!("fixtures directory {} is missing: {e}", dir.display()))
}

pub fn fixture() -> PathBuf {
    fixtures_dir().join("sd15-tiny-diffusers")
}

/// The fixture's tokenizer folder (vocab.json + merges.txt, as the hub ships SD 1.5's): a
/// single file has no tokenizer of its own.
pub fn tokenizer_dir() -> PathBuf {
    fixture().join("tokenizer")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture's tensors by component (`unet`, `vae`, `text_encoder`).
pub fn fixture_parts() -> HashMap<&'static str, HashMap<String, Tensor>> {
    let dir = fixture();
    HashMap::from([
        ("unet", load(&dir.join("unet/diffusion_pytorch_model.safetensors"))),
        ("vae", load(&dir.join("vae/diffusion_pytorch_model.safetensors"))),
        ("text_encoder", load(&dir.join("text_encoder/model.safetensors"))),
    ])
}

/// The single file's tensors: every fixture tensor under the name diffusers maps from (each
/// used exactly once, or the fixture changed and the script must be rerun), plus the
/// non-weight keys real SD 1.5 files carry.
pub fn single_file_tensors() -> HashMap<String, Tensor> {
    let mapping: serde_json::Value = serde_json::from_str(MAPPING).unwrap();
    let parts = fixture_parts();
    let mut out = HashMap::new();
    let mut used = 0;
    for row in mapping["keys"].as_array().unwrap() {
        let (component, name) = (row["component"].as_str().unwrap(), row["diffusers"].as_str().unwrap());
        let shape: Vec<usize> = serde_json::from_value(row["shape"].clone()).unwrap();
        let tensor = parts[component]
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no {component} `{name}`: rerun scripts/sd15_single_file.py"));
        out.insert(row["single"].as_str().unwrap().to_string(), tensor.reshape(shape).unwrap());
        used += 1;
    }
    let total: usize = parts.values().map(HashMap::len).sum();
    assert_eq!(used, total, "the fixture has tensors the mapping lacks: rerun scripts/sd15_single_file.py");
    for row in mapping["extra"].as_array().unwrap() {
        let shape: Vec<usize> = serde_json::from_value(row["shape"].clone()).unwrap();
        let dtype = match row["dtype"].as_str().unwrap() {
            "int64" => DType::I64,
            "float32" => DType::F32,
            other => panic!("dtype {other}"),
        };
        out.insert(row["single"].as_str().unwrap().to_string(), Tensor::zeros(shape, dtype, &Device::Cpu).unwrap());
    }
    out
}

/// Writes the single file to `path`.
pub fn write_single_file(path: &Path) {
    candle_core::safetensors::save(&single_file_tensors(), path).unwrap();
}

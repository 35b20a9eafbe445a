//! Loading weights as users have them: safetensors files (with `.fp16` variants), JSON configs,
//! and a checked `VarBuilder` that collects every missing key and wrong shape of a model into one
//! error instead of stopping at the first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{dir}: missing {}", files.join(", "))]
    MissingFiles { dir: PathBuf, files: Vec<String> },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{source_name}: {} problem(s) with the weights: {}", problems.len(), problems.join("; "))]
    Weights { source_name: String, problems: Vec<String> },
    #[error("{path}: not a usable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{context}: {source}")]
    Candle { context: String, source: candle_core::Error },
}

/// Reads a JSON config file into `T`, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config { path: path.into(), message: e.to_string() })
}

/// Loads every tensor of a safetensors file onto the CPU, as stored.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| LoadError::Safetensors { path: path.into(), message: e.to_string() })
}

/// The first of `<stem>.safetensors`, `<stem>.fp16.safetensors` that exists in `dir`.
pub fn find_weights_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Tensors with `prefix` stripped from their keys (and those without it dropped).
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

/// A backend over a tensor map that records missing keys and wrong shapes and hands out
/// zeros for them, so model construction runs to the end and reports everything at once.
struct CheckedBackend {
    tensors: HashMap<String, Tensor>,
    problems: Arc<Mutex<Vec<String>>>,
}

impl CheckedBackend {
    fn record(&self, problem: String) {
        self.problems.lock().expect("problem list lock").push(problem);
    }
}

impl SimpleBackend for CheckedBackend {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            None => {
                self.record(format!("missing key `{name}` (expected shape {:?})", shape.dims()));
                Tensor::zeros(shape, dtype, dev)
            }
            Some(t) if t.shape() != &shape => {
                self.record(format!("key `{name}` has shape {:?}, expected {:?}", t.dims(), shape.dims()));
                Tensor::zeros(shape, dtype, dev)
            }
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => {
                self.record(format!("missing key `{name}`"));
                candle_core::bail!("missing key `{name}`")
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Records what a model asks for and hands back zero-stride views, so building it costs no
/// memory whatever its size.
struct ShapeRecorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for ShapeRecorder {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().expect("shape list lock").insert(name.to_string(), shape.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor `build` asks for, with its shape, without loading or allocating weights: what
/// a file must hold for the model, to compare with what it does hold before reading it.
pub fn expected_shapes<T>(build: impl FnOnce(VarBuilder) -> candle_core::Result<T>) -> candle_core::Result<BTreeMap<String, Vec<usize>>> {
    let shapes = Arc::new(Mutex::new(BTreeMap::new()));
    let vb = VarBuilder::from_backend(Box::new(ShapeRecorder(shapes.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let shapes = std::mem::take(&mut *shapes.lock().expect("shape list lock"));
    Ok(shapes)
}

/// Builds a model from `tensors` with `build`, reporting all missing keys and wrong shapes
/// together as one [`LoadError::Weights`] naming `source_name` (a file or directory).
pub fn build_checked<T>(
    tensors: HashMap<String, Tensor>,
    source_name: &str,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T, LoadError> {
    let problems = Arc::new(Mutex::new(Vec::new()));
    let backend = CheckedBackend { tensors, problems: problems.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = build(vb);
    let problems = std::mem::take(&mut *problems.lock().expect("problem list lock"));
    if !problems.is_empty() {
        return Err(LoadError::Weights { source_name: source_name.into(), problems });
    }
    built.map_err(|source| LoadError::Candle { context: source_name.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_missing_key_and_wrong_shape_at_once() {
        let mut tensors = HashMap::new();
        tensors.insert("a.weight".to_string(), Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap());
        let err = build_checked(tensors, "model.safetensors", DType::F32, &Device::Cpu, |vb| {
            vb.get((3, 2), "a.weight")?;
            vb.get(4, "b.bias")?;
            vb.get(5, "c.bias")
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("model.safetensors"), "{text}");
        assert!(text.contains("`a.weight` has shape [2, 3], expected [3, 2]"), "{text}");
        assert!(text.contains("missing key `b.bias`"), "{text}");
        assert!(text.contains("missing key `c.bias`"), "{text}");
    }

    #[test]
    fn expected_shapes_lists_every_request() {
        let shapes = expected_shapes(|vb| {
            vb.get((3, 2), "a.weight")?;
            vb.pp("b").get(4, "bias")
        })
        .unwrap();
        assert_eq!(shapes.into_iter().collect::<Vec<_>>(), vec![("a.weight".into(), vec![3, 2]), ("b.bias".into(), vec![4])]);
    }

    #[test]
    fn converts_dtype_of_present_keys() {
        let mut tensors = HashMap::new();
        tensors.insert("w".to_string(), Tensor::ones(2, DType::F16, &Device::Cpu).unwrap());
        let t = build_checked(tensors, "x", DType::F32, &Device::Cpu, |vb| vb.get(2, "w")).unwrap();
        assert_eq!(t.dtype(), DType::F32);
    }
}

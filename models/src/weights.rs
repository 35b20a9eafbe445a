//! Loading weights as users have them: safetensors files (with variants such as `.fp16`, sharded
//! or not), PyTorch `.bin` zip pickles, JSON configs,
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

/// How a diffusers component folder names its weights: `<safetensors>[.<variant>].safetensors`
/// (or sharded: `<safetensors>.safetensors.index[.<variant>].json`), and PyTorch's
/// `<pickle>[.<variant>].bin`. The UNet and VAE use one stem for both; transformers' text
/// encoder uses `model` and `pytorch_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightNames {
    pub safetensors: &'static str,
    pub pickle: &'static str,
}

impl WeightNames {
    pub const DIFFUSERS: WeightNames = WeightNames { safetensors: "diffusion_pytorch_model", pickle: "diffusion_pytorch_model" };
    pub const TRANSFORMERS: WeightNames = WeightNames { safetensors: "model", pickle: "pytorch_model" };

    /// The file names for `variant`: one safetensors file, a sharded one's index, the PyTorch
    /// pickle (diffusers reads the same three; a folder holds one of them).
    pub fn candidates(&self, variant: Option<&str>) -> [String; 3] {
        let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
        [
            format!("{}{v}.safetensors", self.safetensors),
            format!("{}.safetensors.index{v}.json", self.safetensors),
            format!("{}{v}.bin", self.pickle),
        ]
    }
}

/// The weights file of component folder `dir`, chosen as diffusers chooses it: the exact
/// `variant` asked for (none: the plain names), never another one. The error says what is
/// missing and, when the folder holds another variant, which setting would load it.
pub fn find_weights(dir: &Path, names: WeightNames, variant: Option<&str>) -> Result<PathBuf, String> {
    let wanted = names.candidates(variant);
    if let Some(path) = wanted.iter().map(|name| dir.join(name)).find(|p| p.is_file()) {
        return Ok(path);
    }
    let folder = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    let mut message = format!("{folder}/{} (or {})", wanted[0], wanted[2]);
    if let Some(variant) = variant {
        message.push_str(&format!(" for variant \"{variant}\""));
    }
    let others = other_variants(dir, names, variant);
    if !others.is_empty() {
        let settings: Vec<String> = others
            .iter()
            .map(|(file, v)| match v {
                Some(v) => format!("{file} (set variant = \"{v}\")"),
                None => format!("{file} (remove `variant`)"),
            })
            .collect();
        message.push_str(&format!("; the folder has {}", settings.join(", ")));
    }
    Err(message)
}

/// Whether component folder `dir` holds weights of `variant`.
pub fn has_variant(dir: &Path, names: WeightNames, variant: &str) -> bool {
    names.candidates(Some(variant)).iter().any(|name| dir.join(name).is_file())
}

/// Weight files in `dir` of a variant other than `variant` (`None`: no variant).
fn other_variants(dir: &Path, names: WeightNames, variant: Option<&str>) -> Vec<(String, Option<String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(String, Option<String>)> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|file| {
            let of = |stem: &str, ext: &str| -> Option<Option<String>> {
                let middle = file.strip_prefix(stem)?.strip_suffix(ext)?;
                if middle.is_empty() {
                    Some(None)
                } else {
                    middle.strip_prefix('.').filter(|v| !v.is_empty() && !v.contains('.')).map(|v| Some(v.to_string()))
                }
            };
            let v = of(names.safetensors, ".safetensors").or_else(|| of(names.pickle, ".bin"))?;
            (v.as_deref() != variant).then_some((file, v))
        })
        .collect();
    found.sort();
    found
}

/// Reads a weights file by its kind: safetensors, a sharded safetensors index
/// (`*.safetensors.index*.json`, every shard it names), or a PyTorch `.bin` zip pickle (read by
/// [`TensorFile`](crate::tensor_file::TensorFile): candle's unpickler, which never runs code).
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".safetensors") {
        read_safetensors(path)
    } else if name.contains(".safetensors.index") && name.ends_with(".json") {
        read_sharded_safetensors(path)
    } else if name.ends_with(".bin") {
        crate::tensor_file::TensorFile::open(path)?.load_prefixed("")
    } else {
        Err(LoadError::Config { path: path.into(), message: "unknown weights format: expected .safetensors, .safetensors.index.json or a PyTorch .bin".into() })
    }
}

/// Every shard a `*.safetensors.index.json` names (its `weight_map`), each key from the shard
/// the index says.
pub fn read_sharded_safetensors(index: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let map: Index = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&String> = map.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    let mut tensors = HashMap::new();
    for shard in shards {
        let shard_path = dir.join(shard);
        for (key, tensor) in read_safetensors(&shard_path)? {
            if map.weight_map.get(&key) == Some(shard) {
                tensors.insert(key, tensor);
            }
        }
    }
    let missing: Vec<&String> = map.weight_map.keys().filter(|k| !tensors.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(LoadError::Config {
            path: index.into(),
            message: format!("{} key(s) not in the shard the index names, e.g. `{}`", missing.len(), missing[0]),
        });
    }
    Ok(tensors)
}

/// The one-line conversion from a PyTorch file to the safetensors file diffusers would read
/// (`pytorch_model.bin` → `model.safetensors`, `x.bin` → `x.safetensors`).
pub fn convert_hint(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = [".bin", ".ckpt", ".pth", ".pt"].iter().find_map(|ext| name.strip_suffix(ext)).unwrap_or(&name);
    let stem = match stem.strip_prefix("pytorch_model") {
        Some(rest) => format!("model{rest}"),
        None => stem.to_string(),
    };
    let out = path.with_file_name(format!("{stem}.safetensors"));
    format!(
        "python -c \"import torch, safetensors.torch as st; sd = torch.load('{}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{}')\"",
        path.display(),
        out.display()
    )
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

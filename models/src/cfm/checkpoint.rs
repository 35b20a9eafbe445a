//! Loading `EfficientUNet` weights from safetensors or the reference code's own Lightning
//! `.ckpt` (a zip pickle, read without executing it; see [`crate::tensor_file`]): bare
//! reference keys, `net.`-prefixed, or a Lightning state dict (`model.net.`, or the EMA
//! weights `ema_model.ema_model.net.`, preferred when both are present). The file must match the config exactly: missing keys,
//! unexpected keys and shape mismatches are reported together in one error.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::UNetConfig;
use super::unet::EfficientUNet;
use crate::tensor_file::TensorFile;

/// Key prefixes we recognise, in order of preference (EMA weights first: sampling uses them).
pub const PREFIXES: [&str; 3] = ["ema_model.ema_model.net.", "model.net.", "net."];

/// How many names of each kind a mismatch error lists.
const LISTED: usize = 5;

/// What a successful load used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The key prefix the weights were read under (`""` for bare keys).
    pub prefix: String,
    /// Other recognised prefixes that were present but not used (e.g. `model.net.` beside EMA).
    pub skipped_prefixes: Vec<String>,
    /// Parameter tensors loaded.
    pub tensors: usize,
    /// Scalar parameters loaded.
    pub parameters: usize,
    /// Keys of the file outside the chosen prefix (inputs of a golden file, optimizer state...).
    pub ignored_keys: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.prefix.is_empty() { "bare keys" } else { self.prefix.as_str() };
        write!(f, "{} tensors ({} parameters) from {prefix}", self.tensors, self.parameters)?;
        if !self.skipped_prefixes.is_empty() {
            write!(f, ", not using {}", self.skipped_prefixes.join(", "))?;
        }
        if self.ignored_keys > 0 {
            write!(f, ", {} other keys ignored", self.ignored_keys)?;
        }
        Ok(())
    }
}

/// A weights file that does not fit the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, expected shape, shape in the file)
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl Mismatch {
    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.wrong_shape.is_empty()
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(f: &mut fmt::Formatter<'_>, what: &str, items: Vec<String>) -> fmt::Result {
            if items.is_empty() {
                return Ok(());
            }
            let more = items.len().saturating_sub(LISTED);
            write!(f, "; {} {what}: {}", items.len(), items[..items.len().min(LISTED)].join(", "))?;
            if more > 0 {
                write!(f, " (and {more} more)")?;
            }
            Ok(())
        }
        write!(f, "weights do not match the UNet config")?;
        list(f, "missing", self.missing.clone())?;
        list(f, "unexpected", self.unexpected.clone())?;
        let shapes = self.wrong_shape.iter().map(|(n, want, got)| format!("{n} (expected {want:?}, found {got:?})")).collect();
        list(f, "with a wrong shape", shapes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{source_name}: {message}")]
    Read { source_name: String, message: String },
    #[error("{source_name}: {mismatch} (prefix `{prefix}`)")]
    Mismatch { source_name: String, prefix: String, mismatch: Mismatch },
    #[error("{0}")]
    Config(String),
    #[error("{source_name}: building the UNet: {error}")]
    Build { source_name: String, error: candle_core::Error },
}

/// Where weights come from.
pub enum WeightSource<'a> {
    /// A safetensors file (memory-mapped; only the chosen prefix is read).
    File(&'a Path),
    /// Tensors already in memory (a golden file, a checkpoint read elsewhere).
    Tensors(&'a HashMap<String, Tensor>),
}

impl WeightSource<'_> {
    fn name(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Tensors(_) => "in-memory weights".into(),
        }
    }
}

/// Loads an [`EfficientUNet`] of `config` from `source`, in `dtype` on `device`.
pub fn load_unet(
    source: WeightSource<'_>,
    config: &UNetConfig,
    device: &Device,
    dtype: DType,
) -> Result<(EfficientUNet, LoadReport), LoadError> {
    config.validate().map_err(LoadError::Config)?;
    let source_name = source.name();
    let read_error = |message: String| LoadError::Read { source_name: source_name.clone(), message };

    let file;
    let shapes: Vec<(String, Vec<usize>)> = match &source {
        WeightSource::File(path) => {
            file = Some(TensorFile::open(path).map_err(|e| LoadError::Read { source_name: source_name.clone(), message: e.to_string() })?);
            file.as_ref().expect("just set").shapes().iter().map(|(name, shape)| (name.clone(), shape.clone())).collect()
        }
        WeightSource::Tensors(map) => {
            file = None;
            map.iter().map(|(name, t)| (name.clone(), t.dims().to_vec())).collect()
        }
    };

    let (prefix, skipped_prefixes) = choose_prefix(shapes.iter().map(|(n, _)| n.as_str()));
    let found: BTreeMap<String, Vec<usize>> = shapes
        .iter()
        .filter_map(|(name, shape)| name.strip_prefix(prefix).map(|n| (n.to_string(), shape.clone())))
        .collect();
    let ignored_keys = shapes.len() - found.len();
    let expected = parameter_shapes(config).map_err(|e| LoadError::Config(e.to_string()))?;
    let mismatch = compare(&expected, &found);
    if !mismatch.is_empty() {
        return Err(LoadError::Mismatch { source_name, prefix: prefix.to_string(), mismatch });
    }

    let mut tensors = HashMap::with_capacity(expected.len());
    for name in expected.keys() {
        let full = format!("{prefix}{name}");
        let tensor = match (&source, &file) {
            (WeightSource::File(_), Some(file)) => file.load(&full).map_err(|e| read_error(e.to_string()))?,
            (WeightSource::Tensors(map), _) => map[&full].clone(),
            (WeightSource::File(_), None) => unreachable!("files are always opened"),
        };
        let tensor = tensor
            .to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(|e| read_error(format!("tensor `{full}`: {e}")))?;
        tensors.insert(name.clone(), tensor);
    }
    let report = LoadReport {
        prefix: prefix.to_string(),
        skipped_prefixes: skipped_prefixes.into_iter().map(String::from).collect(),
        tensors: expected.len(),
        parameters: expected.values().map(|s| s.iter().product::<usize>()).sum(),
        ignored_keys,
    };
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let unet = EfficientUNet::new(config, vb).map_err(|error| LoadError::Build { source_name, error })?;
    Ok((unet, report))
}

/// The first recognised prefix any key carries (EMA first), or `""` for bare keys; plus the
/// other recognised prefixes that were present.
fn choose_prefix<'a>(names: impl Iterator<Item = &'a str> + Clone) -> (&'static str, Vec<&'static str>) {
    let present: Vec<&'static str> =
        PREFIXES.iter().copied().filter(|p| names.clone().any(|n| n.starts_with(p))).collect();
    match present.split_first() {
        Some((first, rest)) => (first, rest.to_vec()),
        None => ("", Vec::new()),
    }
}

fn compare(expected: &BTreeMap<String, Vec<usize>>, found: &BTreeMap<String, Vec<usize>>) -> Mismatch {
    let mut mismatch = Mismatch { missing: Vec::new(), unexpected: Vec::new(), wrong_shape: Vec::new() };
    for (name, shape) in expected {
        match found.get(name) {
            None => mismatch.missing.push(name.clone()),
            Some(got) if got != shape => mismatch.wrong_shape.push((name.clone(), shape.clone(), got.clone())),
            Some(_) => {}
        }
    }
    mismatch.unexpected = found.keys().filter(|n| !expected.contains_key(*n)).cloned().collect();
    mismatch
}

/// Every parameter of the network of `config`, by reference name (no prefix), with its shape
/// (building it through a recorder costs no memory, whatever the config).
pub fn parameter_shapes(config: &UNetConfig) -> candle_core::Result<BTreeMap<String, Vec<usize>>> {
    crate::weights::expected_shapes(|vb| EfficientUNet::new(config, vb))
}

/// Total scalar parameters of the network of `config`.
pub fn parameter_count(config: &UNetConfig) -> candle_core::Result<usize> {
    Ok(parameter_shapes(config)?.values().map(|s| s.iter().product::<usize>()).sum())
}

/// Convenience for callers holding a path.
pub fn load_unet_file(
    path: impl Into<PathBuf>,
    config: &UNetConfig,
    device: &Device,
    dtype: DType,
) -> Result<(EfficientUNet, LoadReport), LoadError> {
    let path = path.into();
    load_unet(WeightSource::File(&path), config, device, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cfm::config::tiny;

    /// Random weights for every parameter of `config`, under `prefix`.
    fn weights(config: &UNetConfig, prefix: &str) -> HashMap<String, Tensor> {
        parameter_shapes(config)
            .unwrap()
            .into_iter()
            .map(|(name, shape)| (format!("{prefix}{name}"), Tensor::randn(0f32, 0.1, shape, &Device::Cpu).unwrap()))
            .collect()
    }

    #[test]
    fn one_error_names_missing_unexpected_and_misshapen_keys() {
        let config = tiny(false);
        let mut map = weights(&config, "net.");
        map.remove("net.out.2.bias").unwrap();
        map.insert("net.input_blocks.9.0.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
        map.insert("net.time_embed.0.weight".into(), Tensor::zeros((128, 31), DType::F32, &Device::Cpu).unwrap());
        let err = load_unet(WeightSource::Tensors(&map), &config, &Device::Cpu, DType::F32).unwrap_err();
        let LoadError::Mismatch { ref mismatch, ref prefix, .. } = err else { panic!("{err}") };
        assert_eq!(prefix, "net.");
        assert_eq!(mismatch.missing, vec!["out.2.bias".to_string()]);
        assert_eq!(mismatch.unexpected, vec!["input_blocks.9.0.weight".to_string()]);
        assert_eq!(mismatch.wrong_shape, vec![("time_embed.0.weight".to_string(), vec![128, 32], vec![128, 31])]);
        let message = err.to_string();
        for part in ["1 missing: out.2.bias", "1 unexpected: input_blocks.9.0.weight", "time_embed.0.weight (expected [128, 32], found [128, 31])"] {
            assert!(message.contains(part), "{message}");
        }
    }

    #[test]
    fn long_lists_are_cut_with_a_count() {
        let config = tiny(false);
        let err = load_unet(WeightSource::Tensors(&HashMap::new()), &config, &Device::Cpu, DType::F32).unwrap_err();
        let total = parameter_shapes(&config).unwrap().len();
        let message = err.to_string();
        assert!(message.contains(&format!("{total} missing")), "{message}");
        assert!(message.contains(&format!("(and {} more)", total - LISTED)), "{message}");
    }

    #[test]
    fn prefers_ema_weights_and_reports_the_prefix() {
        let config = tiny(false);
        let mut map = weights(&config, "model.net.");
        map.extend(weights(&config, "ema_model.ema_model.net."));
        map.insert("ema_model.num_updates".into(), Tensor::zeros((), DType::F32, &Device::Cpu).unwrap());
        let (_, report) = load_unet(WeightSource::Tensors(&map), &config, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(report.prefix, "ema_model.ema_model.net.");
        assert_eq!(report.skipped_prefixes, vec!["model.net.".to_string()]);
        assert_eq!(report.ignored_keys, report.tensors + 1);
        assert_eq!(report.parameters, parameter_count(&config).unwrap());
    }

    #[test]
    fn bare_and_prefixed_files_load_the_same_network() {
        let config = tiny(true);
        let bare = weights(&config, "");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lightning.safetensors");
        let prefixed: HashMap<String, Tensor> = bare.iter().map(|(k, v)| (format!("model.net.{k}"), v.clone())).collect();
        candle_core::safetensors::save(&prefixed, &path).unwrap();

        let (from_map, report) = load_unet(WeightSource::Tensors(&bare), &config, &Device::Cpu, DType::F32).unwrap();
        assert_eq!((report.prefix.as_str(), report.ignored_keys), ("", 0));
        let (from_file, report) = load_unet_file(&path, &config, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(report.prefix, "model.net.");

        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.1f32, 0.9], &Device::Cpu).unwrap();
        let a = from_map.forward(&x, &t, Some(&x)).unwrap();
        let b = from_file.forward(&x, &t, Some(&x)).unwrap();
        assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let err = load_unet_file("/nonexistent/cfm.safetensors", &tiny(false), &Device::Cpu, DType::F32).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cfm.safetensors"), "{err}");
    }

    #[test]
    fn paper_config_has_306m_parameters() {
        let n = parameter_count(&UNetConfig::paper()).unwrap();
        assert!((305_000_000..307_000_000).contains(&n), "{n}");
    }
}

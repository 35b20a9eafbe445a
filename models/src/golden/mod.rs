//! Checks against reference vectors (`shared/golden`): each file is recognised by its keys
//! and configuration metadata, run, and compared by relative error ‖ours − ref‖ / ‖ref‖.
//!
//! The per-family checks live in submodules; each returns `None` for a file that is not its
//! own, so one dispatcher serves `fmboost check-golden` and the tests alike.

pub mod cfm;
pub mod sd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Errors from reading or running a golden file.
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: not understood: {message}")]
    NotUnderstood { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Run { path: PathBuf, message: String },
}

/// One comparison: our result against the reference.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tolerance: f64,
}

impl Check {
    /// NaN never passes.
    pub fn ok(&self) -> bool {
        self.rel_err.is_finite() && self.rel_err <= self.tolerance
    }
}

/// How to run a golden file: on which device and in which dtype (tolerances scale with it).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    pub dtype: DType,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32 }
    }
}

impl RunOptions {
    /// Tolerance for a single forward pass in this dtype. f32/f64: the README's 1e-4.
    /// Half precision rounds every activation to 8 (bf16) or 11 (f16) mantissa bits, about
    /// 4e-3 (bf16) per rounding, and a forward pass compounds a few dozen of them: 2e-2.
    pub fn forward_tolerance(&self) -> f64 {
        match self.dtype {
            DType::F32 | DType::F64 => 1e-4,
            DType::BF16 | DType::F16 => 2e-2,
            // Integer dtypes never reach a network (parse_dtype offers only floats).
            _ => 1e-4,
        }
    }

    /// Tolerance for a multi-step loop in this dtype. f32/f64: the README's 1e-3 (ten times
    /// a forward pass); half precision: 5e-2, since each step feeds the next its rounding.
    pub fn loop_tolerance(&self) -> f64 {
        match self.dtype {
            DType::F32 | DType::F64 => 1e-3,
            DType::BF16 | DType::F16 => 5e-2,
            _ => 1e-3,
        }
    }
}

/// A golden safetensors file: its tensors (on the CPU, as stored) and its string metadata.
pub struct GoldenFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl GoldenFile {
    pub fn load(path: &Path) -> Result<Self, GoldenError> {
        let bytes = std::fs::read(path).map_err(|source| GoldenError::Io { path: path.into(), source })?;
        let format = |message: String| GoldenError::Format { path: path.into(), message };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| format(e.to_string()))?;
        Ok(Self { path: path.into(), tensors, metadata })
    }

    /// The file name, as printed in reports.
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// A tensor by key, or an error naming the key.
    pub fn tensor(&self, key: &str) -> Result<&Tensor, GoldenError> {
        self.tensors.get(key).ok_or_else(|| self.run_error(format!("missing tensor `{key}`")))
    }

    /// A metadata entry parsed as JSON, or an error naming the key.
    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, GoldenError> {
        let raw = self.metadata.get(key).ok_or_else(|| self.run_error(format!("missing metadata `{key}`")))?;
        serde_json::from_str(raw).map_err(|e| self.run_error(format!("metadata `{key}`: {e}")))
    }

    /// All tensors whose key starts with `prefix`, with the prefix kept.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn run_error(&self, message: impl Into<String>) -> GoldenError {
        GoldenError::Run { path: self.path.clone(), message: message.into() }
    }
}

/// ‖ours − reference‖₂ / ‖reference‖₂ in f64, on the CPU.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> candle_core::Result<f64> {
    let ours = ours.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let reference = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    if ours.dims() != reference.dims() {
        candle_core::bail!("shape {:?} differs from the reference's {:?}", ours.dims(), reference.dims());
    }
    let diff = (&ours - &reference)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = reference.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm == 0.0 { diff } else { diff / norm })
}

/// Recognises `path` by its keys and metadata and runs its checks.
pub fn check_file(path: &Path, options: &RunOptions) -> Result<Vec<Check>, GoldenError> {
    let file = GoldenFile::load(path)?;
    if let Some(result) = cfm::checks(&file, options) {
        return result;
    }
    if let Some(result) = sd::checks(&file, options) {
        return result;
    }
    let mut keys: Vec<_> = file.tensors.keys().filter(|k| !k.contains('.') || k.starts_with("input.")).cloned().collect();
    keys.sort();
    Err(GoldenError::NotUnderstood {
        path: path.into(),
        message: format!(
            "no known family matches (metadata keys: {:?}, input tensors: {:?})",
            {
                let mut m: Vec<_> = file.metadata.keys().cloned().collect();
                m.sort();
                m
            },
            keys
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerances_per_dtype_are_the_documented_ones() {
        let with = |dtype| RunOptions { device: Device::Cpu, dtype };
        assert_eq!((with(DType::F32).forward_tolerance(), with(DType::F32).loop_tolerance()), (1e-4, 1e-3));
        assert_eq!((with(DType::BF16).forward_tolerance(), with(DType::BF16).loop_tolerance()), (2e-2, 5e-2));
        assert_eq!((with(DType::F16).forward_tolerance(), with(DType::F16).loop_tolerance()), (2e-2, 5e-2));
        let nan = Check { name: "x".into(), rel_err: f64::NAN, tolerance: 1.0 };
        assert!(!nan.ok());
    }
}

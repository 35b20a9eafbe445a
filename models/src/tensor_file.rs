//! One weights file of either format users hold, read lazily: safetensors (memory-mapped) or
//! a PyTorch zip pickle (`.ckpt` / `.pt` / `.pth` / `.bin`), read by candle's pickle reader,
//! which interprets the pickle's opcodes without executing any code. A Lightning checkpoint
//! keeps its weights under `state_dict`; a plain `torch.save(model.state_dict())` at the top.
//!
//! Only the tensors a model asks for are read, so a 4 GB single-file checkpoint or a Lightning
//! file with online, EMA and first-stage weights costs the memory of the part being loaded.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use crate::weights::{convert_hint, LoadError};

/// The two leading bytes of a zip archive (PyTorch's format since 1.6).
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

enum Format {
    Safetensors { tensors: MmapedSafetensors, metadata: HashMap<String, String> },
    Pickle { tensors: PthTensors },
}

/// An opened weights file: names and shapes up front, tensors on request.
pub struct TensorFile {
    path: PathBuf,
    format: Format,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl TensorFile {
    /// Opens `path`, telling the format by its first bytes (not its extension).
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let io = |source: std::io::Error| LoadError::Io { path: path.into(), source };
        let mut head = [0u8; 4];
        let mut file = std::fs::File::open(path).map_err(io)?;
        let read = file.read(&mut head).map_err(io)?;
        if read == 4 && &head == ZIP_MAGIC {
            Self::open_pickle(path)
        } else if read >= 2 && head[..2] == [0x80, 0x02] || is_pickle_name(path) {
            Err(LoadError::Safetensors {
                path: path.into(),
                message: format!(
                    "not a zip-format PyTorch file (a legacy pickle saved by torch < 1.6, or not PyTorch at all), which is not read; \
                     convert it to safetensors: {}",
                    convert_hint(path)
                ),
            })
        } else {
            Self::open_safetensors(path)
        }
    }

    fn open_safetensors(path: &Path) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Safetensors { path: path.into(), message };
        // SAFETY: read-only mapping; a weights file must not be rewritten while it is loaded.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| bad(without_backtrace(e)))?;
        let shapes = tensors.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
        let metadata = read_safetensors_metadata(path).map_err(bad)?;
        Ok(Self { path: path.into(), format: Format::Safetensors { tensors, metadata }, shapes })
    }

    fn open_pickle(path: &Path) -> Result<Self, LoadError> {
        let bad = |e: candle_core::Error| {
            let e = without_backtrace(e);
            // candle rebuilds plain containers only; other Python objects outside the weights
            // (a dict subclass, say) stop the whole read.
            let hint = if e.contains("expected a dict") || e.contains("expected a list") {
                "; it holds Python objects candle's reader cannot rebuild: save the weights alone, e.g. \
                 `torch.save(torch.load(f, weights_only=False)[\"state_dict\"], out)`, or as safetensors"
                    .to_string()
            } else {
                format!("; convert it to safetensors: {}", convert_hint(path))
            };
            LoadError::Safetensors { path: path.into(), message: format!("not a readable PyTorch checkpoint (zip pickle): {e}{hint}") }
        };
        // A Lightning checkpoint nests the weights under `state_dict`; candle reports a
        // missing key as an error, and then the file is a bare state dict.
        let tensors = match PthTensors::new(path, Some("state_dict")) {
            Ok(tensors) => tensors,
            Err(e) if e.to_string().contains("key state_dict not found") => PthTensors::new(path, None).map_err(bad)?,
            Err(e) => return Err(bad(e)),
        };
        let shapes: BTreeMap<String, Vec<usize>> =
            tensors.tensor_infos().iter().map(|(name, info)| (name.clone(), info.layout.dims().to_vec())).collect();
        if shapes.is_empty() {
            return Err(LoadError::Safetensors { path: path.into(), message: "a PyTorch checkpoint without tensors".into() });
        }
        Ok(Self { path: path.into(), format: Format::Pickle { tensors }, shapes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    /// The safetensors header's `__metadata__` (empty for pickles).
    pub fn metadata(&self) -> HashMap<String, String> {
        match &self.format {
            Format::Safetensors { metadata, .. } => metadata.clone(),
            Format::Pickle { .. } => HashMap::new(),
        }
    }

    /// One tensor, on the CPU, as stored.
    pub fn load(&self, name: &str) -> Result<Tensor, LoadError> {
        let bad = |message: String| LoadError::Safetensors { path: self.path.clone(), message: format!("tensor `{name}`: {message}") };
        match &self.format {
            Format::Safetensors { tensors, .. } => tensors.load(name, &Device::Cpu).map_err(|e| bad(without_backtrace(e))),
            Format::Pickle { tensors } => tensors.get(name).map_err(|e| bad(without_backtrace(e)))?.ok_or_else(|| bad("not in the file".into())),
        }
    }

    /// The tensors whose names start with `prefix`, keyed without it.
    pub fn load_prefixed(&self, prefix: &str) -> Result<HashMap<String, Tensor>, LoadError> {
        let mut out = HashMap::new();
        for name in self.shapes.keys() {
            if let Some(short) = name.strip_prefix(prefix) {
                out.insert(short.to_string(), self.load(name)?);
            }
        }
        Ok(out)
    }
}

/// A PyTorch file by its name; only zip pickles of these are read, never as safetensors.
fn is_pickle_name(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ["bin", "ckpt", "pt", "pth"].iter().any(|p| ext.eq_ignore_ascii_case(p)))
}

/// candle's error without the backtrace it carries when `RUST_BACKTRACE` is set.
fn without_backtrace(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
        other => other.to_string(),
    }
}

/// The `__metadata__` of a safetensors header, read from the header alone.
fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    // safetensors caps the header at 100 MB; MmapedSafetensors has checked it already.
    let mut header = vec![0u8; len.min(100_000_000) as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let Some(metadata) = header.get("__metadata__") else { return Ok(HashMap::new()) };
    serde_json::from_value(metadata.clone()).map_err(|e| format!("__metadata__: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn safetensors_names_shapes_metadata_and_lazy_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::ones(4, DType::F16, &Device::Cpu).unwrap();
        let tensors: HashMap<String, Tensor> = [("x.a".to_string(), a.clone()), ("y.b".to_string(), b)].into();
        let metadata = Some(HashMap::from([("ddconfig".to_string(), "{}".to_string())]));
        safetensors::serialize_to_file(&tensors, metadata, &path).unwrap();
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.shapes().get("x.a"), Some(&vec![2, 3]));
        assert_eq!(file.metadata().get("ddconfig").map(String::as_str), Some("{}"));
        let x = file.load_prefixed("x.").unwrap();
        assert_eq!(x["a"].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert!(file.load("z").unwrap_err().to_string().contains("`z`"));
    }

    #[test]
    fn unreadable_files_name_the_path_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.ckpt");
        std::fs::write(&path, b"PK\x03\x04 not really a zip").unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("junk.ckpt") && err.contains("PyTorch checkpoint"), "{err}");
        std::fs::write(&path, b"\x80\x02legacy").unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("legacy") && err.contains("st.save_file(") && err.contains("junk.safetensors"), "{err}");
        std::fs::write(&path, b"plain text").unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("junk.ckpt") && err.contains("not a zip-format PyTorch file"), "{err}");
        let err = TensorFile::open(&dir.path().join("missing.safetensors")).err().unwrap().to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
    }
}

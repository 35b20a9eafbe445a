//! Resumable training checkpoints in one safetensors file.
//!
//! Keys: the weights under the layout's model prefix, the EMA weights under its EMA prefix,
//! the Adam moments under `optimizer.exp_avg.<name>` / `optimizer.exp_avg_sq.<name>`.
//! For CFM and base networks the prefixes are the reference Lightning module's
//! (`model.net.` and `ema_model.ema_model.net.`), so `cfm::load_unet` reads a checkpoint as it
//! reads a converted reference checkpoint (EMA weights first). Counters and the model's config
//! go in the safetensors metadata under `fmboost.*`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use super::ema::Ema;
use super::optim::Adam;

/// Where the weights go in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub model_prefix: &'static str,
    /// `None`: the run keeps no EMA.
    pub ema_prefix: Option<&'static str>,
}

/// CFM upsamplers and the base generator: the reference's Lightning names.
pub const UNET_LAYOUT: Layout = Layout { model_prefix: "model.net.", ema_prefix: Some("ema_model.ema_model.net.") };
/// The autoencoder: bare diffusers `AutoencoderKL` names, no EMA (as LDM trains its first stage).
pub const AUTOENCODER_LAYOUT: Layout = Layout { model_prefix: "", ema_prefix: None };

/// Metadata keys.
pub const META_KIND: &str = "fmboost.kind";
pub const META_CONFIG: &str = "fmboost.config";
pub const META_STEP: &str = "fmboost.step";
pub const META_ADAM_UPDATES: &str = "fmboost.adam_updates";
pub const META_EMA_CALLS: &str = "fmboost.ema_calls";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint `{path}`: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("checkpoint `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint `{path}`: {source}")]
    Candle { path: PathBuf, source: candle_core::Error },
}

/// A checkpoint read into memory.
pub struct Checkpoint {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Checkpoint {
    fn invalid(&self, message: String) -> CheckpointError {
        CheckpointError::Invalid { path: self.path.clone(), message }
    }

    /// A metadata value, or an error naming the key.
    pub fn meta(&self, key: &str) -> Result<&str, CheckpointError> {
        self.metadata.get(key).map(String::as_str).ok_or_else(|| self.invalid(format!("metadata lacks `{key}`")))
    }

    /// A metadata value parsed as an integer.
    pub fn meta_u64(&self, key: &str) -> Result<u64, CheckpointError> {
        let v = self.meta(key)?;
        v.parse().map_err(|e| self.invalid(format!("metadata `{key}` = `{v}`: {e}")))
    }

    /// The weights under `prefix`, in the order of `params`, with their shapes checked.
    pub fn weights(&self, prefix: &str, params: &[(String, Var)]) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        params
            .iter()
            .map(|(name, var)| {
                let key = format!("{prefix}{name}");
                let t = self.tensors.get(&key).ok_or_else(|| self.invalid(format!("lacks `{key}`")))?;
                if t.dims() != var.dims() {
                    return Err(self.invalid(format!("`{key}` has shape {:?}, the model {:?}", t.dims(), var.dims())));
                }
                Ok((name.clone(), t.clone()))
            })
            .collect()
    }
}

/// Reads a checkpoint (tensors on `device`).
pub fn read(path: &Path, device: &Device) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_owned(), source })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| CheckpointError::Invalid { path: path.to_owned(), message: e.to_string() })?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|source| CheckpointError::Candle { path: path.to_owned(), source })?;
    Ok(Checkpoint { path: path.to_owned(), tensors, metadata })
}

/// Everything a run needs to write a checkpoint.
pub struct Snapshot<'a> {
    pub layout: Layout,
    pub adam: &'a Adam,
    pub ema: Option<&'a Ema>,
    /// Optimizer steps done.
    pub step: u64,
    /// `fmboost.kind`, `fmboost.config` and anything else the caller records.
    pub metadata: BTreeMap<String, String>,
}

/// Writes the snapshot atomically (temporary file, then rename).
pub fn write(path: &Path, snap: &Snapshot<'_>) -> Result<(), CheckpointError> {
    let err = |message: String| CheckpointError::Invalid { path: path.to_owned(), message };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in snap.adam.params() {
        tensors.push((format!("{}{name}", snap.layout.model_prefix), var.as_tensor().clone()));
    }
    match (snap.layout.ema_prefix, snap.ema) {
        (Some(prefix), Some(ema)) => {
            tensors.extend(ema.weights().iter().map(|(n, t)| (format!("{prefix}{n}"), t.clone())));
        }
        (None, None) => {}
        (Some(_), None) => return Err(err("the layout has an EMA prefix but the run keeps no EMA".into())),
        (None, Some(_)) => return Err(err("the run keeps an EMA but the layout has no EMA prefix".into())),
    }
    tensors.extend(snap.adam.state());
    let mut metadata: HashMap<String, String> = snap.metadata.clone().into_iter().collect();
    metadata.insert(META_STEP.into(), snap.step.to_string());
    metadata.insert(META_ADAM_UPDATES.into(), snap.adam.updates().to_string());
    if let Some(ema) = snap.ema {
        metadata.insert(META_EMA_CALLS.into(), ema.calls().to_string());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| CheckpointError::Io { path: path.to_owned(), source })?;
    }
    // Contiguous CPU copies: safetensors writes raw bytes.
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|source| CheckpointError::Candle { path: path.to_owned(), source })?;
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| err(e.to_string()))
}

/// Restores weights, Adam moments and the EMA from `ckpt`; returns the step to resume at.
/// `kind` must match the checkpoint's `fmboost.kind`.
pub fn restore(ckpt: &Checkpoint, kind: &str, layout: Layout, adam: &mut Adam, ema: Option<&mut Ema>) -> Result<u64, CheckpointError> {
    let found = ckpt.meta(META_KIND)?;
    if found != kind {
        return Err(ckpt.invalid(format!("holds a `{found}` run, not `{kind}`")));
    }
    let candle = |source| CheckpointError::Candle { path: ckpt.path.clone(), source };
    let params = adam.params().to_vec();
    for ((_, var), (_, t)) in params.iter().zip(ckpt.weights(layout.model_prefix, &params)?) {
        var.set(&t.to_dtype(var.dtype()).map_err(candle)?).map_err(candle)?;
    }
    adam.load_state(&ckpt.tensors, ckpt.meta_u64(META_ADAM_UPDATES)?).map_err(candle)?;
    match (layout.ema_prefix, ema) {
        (Some(prefix), Some(ema)) => {
            let weights = ckpt.weights(prefix, &params)?;
            ema.load(weights, ckpt.meta_u64(META_EMA_CALLS)?).map_err(candle)?;
        }
        (None, None) => {}
        _ => return Err(ckpt.invalid("EMA presence differs between the run and the layout".into())),
    }
    ckpt.meta_u64(META_STEP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ema::EmaConfig;
    use crate::train::optim::AdamConfig;

    fn params() -> Vec<(String, Var)> {
        vec![
            ("input_blocks.0.0.weight".into(), Var::from_slice(&[1.0f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu).unwrap()),
            ("out.2.bias".into(), Var::from_slice(&[0.5f32], 1, &Device::Cpu).unwrap()),
        ]
    }

    #[test]
    fn writes_reference_names_and_restores_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ckpt.safetensors");
        let p = params();
        let mut adam = Adam::new(p.clone(), AdamConfig::default()).unwrap();
        let mut ema = Ema::new(&p, EmaConfig::default()).unwrap();
        let loss = p.iter().map(|(_, v)| v.as_tensor().sqr().unwrap().sum_all().unwrap()).reduce(|a, b| (a + b).unwrap()).unwrap();
        adam.step(&loss.backward().unwrap(), 0.1).unwrap();
        ema.update(&p).unwrap();
        let metadata = BTreeMap::from([(META_KIND.to_string(), "cfm".to_string()), (META_CONFIG.to_string(), "{}".to_string())]);
        write(&path, &Snapshot { layout: UNET_LAYOUT, adam: &adam, ema: Some(&ema), step: 1, metadata }).unwrap();

        let ckpt = read(&path, &Device::Cpu).unwrap();
        for key in [
            "model.net.input_blocks.0.0.weight",
            "ema_model.ema_model.net.out.2.bias",
            "optimizer.exp_avg.out.2.bias",
            "optimizer.exp_avg_sq.input_blocks.0.0.weight",
        ] {
            assert!(ckpt.tensors.contains_key(key), "{key}");
        }
        assert_eq!(ckpt.tensors.len(), 8);

        let fresh = params();
        let mut adam2 = Adam::new(fresh.clone(), AdamConfig::default()).unwrap();
        let mut ema2 = Ema::new(&fresh, EmaConfig::default()).unwrap();
        let step = restore(&ckpt, "cfm", UNET_LAYOUT, &mut adam2, Some(&mut ema2)).unwrap();
        assert_eq!(step, 1);
        assert_eq!((adam2.updates(), ema2.calls()), (1, 1));
        assert_eq!(
            fresh[1].1.as_tensor().to_vec1::<f32>().unwrap(),
            p[1].1.as_tensor().to_vec1::<f32>().unwrap()
        );
        let err = restore(&ckpt, "base", UNET_LAYOUT, &mut adam2, Some(&mut ema2)).err().unwrap().to_string();
        assert!(err.contains("`cfm` run"), "{err}");
    }

    #[test]
    fn wrong_shapes_and_missing_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ae.safetensors");
        let p = params();
        let adam = Adam::new(p, AdamConfig::default()).unwrap();
        let metadata = BTreeMap::from([(META_KIND.to_string(), "autoencoder".to_string())]);
        write(&path, &Snapshot { layout: AUTOENCODER_LAYOUT, adam: &adam, ema: None, step: 0, metadata }).unwrap();
        let ckpt = read(&path, &Device::Cpu).unwrap();
        let other = vec![("out.2.bias".to_string(), Var::from_slice(&[0.0f32, 0.0], 2, &Device::Cpu).unwrap())];
        let err = ckpt.weights("", &other).err().unwrap().to_string();
        assert!(err.contains("out.2.bias") && err.contains("[2]"), "{err}");
        let missing = vec![("nope".to_string(), Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap())];
        assert!(ckpt.weights("", &missing).err().unwrap().to_string().contains("`nope`"));
        assert!(read(&dir.path().join("absent"), &Device::Cpu).err().unwrap().to_string().contains("absent"));
    }
}

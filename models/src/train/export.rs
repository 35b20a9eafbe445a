//! Writing trained models in the layouts the loaders read: the autoencoder as a diffusers
//! `vae/` folder, a UNet as bare reference-named weights with its config in the metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::autoencoder::AutoencoderConfig;
use crate::cfm::UNetConfig;

/// Metadata key of a UNet file's config JSON (as in the golden files).
pub const UNET_CONFIG_KEY: &str = "config";

fn write_safetensors(path: &Path, tensors: Vec<(String, Tensor)>, metadata: HashMap<String, String>) -> candle_core::Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

/// Writes `dir/config.json` and `dir/diffusion_pytorch_model.safetensors`
/// (`Autoencoder::load_diffusers_dir` reads them back).
pub fn export_autoencoder(dir: &Path, config: &AutoencoderConfig, weights: Vec<(String, Tensor)>) -> candle_core::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    std::fs::write(dir.join("config.json"), json)?;
    write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), weights, HashMap::new())
}

/// Writes a UNet's weights with bare reference names and its config JSON under `config` in the
/// metadata, plus `extra` metadata (hop settings, training summary).
pub fn export_unet(path: &Path, config: &UNetConfig, weights: Vec<(String, Tensor)>, mut extra: HashMap<String, String>) -> candle_core::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::to_string(config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    extra.insert(UNET_CONFIG_KEY.into(), json);
    write_safetensors(path, weights, extra)
}

/// Reads the config of a file written by [`export_unet`] (or a training checkpoint, whose
/// `fmboost.config` holds it).
pub fn read_unet_config(path: &Path) -> Result<UNetConfig, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let json = meta
        .get(UNET_CONFIG_KEY)
        .or_else(|| meta.get(super::checkpoint::META_CONFIG))
        .ok_or_else(|| format!("{}: no UNet config in the metadata (`{UNET_CONFIG_KEY}`)", path.display()))?;
    UNetConfig::from_json(json).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoencoder::Autoencoder;
    use crate::cfm::{load_unet_file, EfficientUNet};
    use crate::train::nets::named_vars;
    use crate::train::presets;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn exported_models_load_with_the_project_loaders() {
        let dir = tempfile::tempdir().unwrap();
        let config = presets::tiny_autoencoder();
        let varmap = VarMap::new();
        Autoencoder::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let weights = named_vars(&varmap).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        export_autoencoder(&dir.path().join("vae"), &config, weights).unwrap();
        let ae = Autoencoder::load_diffusers_dir(&dir.path().join("vae"), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ae.config(), &config);

        let unet = presets::tiny_hop_unet();
        let varmap = VarMap::new();
        EfficientUNet::new(&unet, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let weights = named_vars(&varmap).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let path = dir.path().join("hop.safetensors");
        export_unet(&path, &unet, weights, HashMap::from([("upsample".to_string(), "bilinear".to_string())])).unwrap();
        assert_eq!(read_unet_config(&path).unwrap(), unet);
        let (_, report) = load_unet_file(&path, &unet, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(report.prefix, "");
        let bad = dir.path().join("vae/diffusion_pytorch_model.safetensors");
        assert!(read_unet_config(&bad).unwrap_err().contains("no UNet config"));
    }
}

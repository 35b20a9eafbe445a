//! Single-file SD 1.x checkpoints, the CompVis / A1111 layout most people hold: one file
//! (`.safetensors`, or a `.ckpt` zip pickle) with the UNet under `model.diffusion_model.`, the
//! CLIP text encoder under `cond_stage_model.transformer.` and the VAE under
//! `first_stage_model.` (read by the autoencoder's LDM loader, pointed at the same file).
//!
//! The architecture is SD 1.5's, built in, unless a diffusers directory is given for it
//! (`config`, as diffusers' `from_single_file(config=…)`), for non-standard sizes. A single
//! file has no tokenizer: it comes from `tokenizer` or the config directory's `tokenizer/`.
//!
//! Every key of the file is accounted for before any tensor is read: used by the UNet or the
//! text encoder, left to the autoencoder, or one of the known non-weights (the DDPM schedule
//! buffers LDM saves, the EMA copy `model_ema.*`, CLIP's `position_ids`); anything else,
//! and any key the networks need but the file lacks, is listed in one error naming the file.

pub mod unet_keys;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;

use super::{ClipConfig, LoadOptions, SchedulerConfig, StableDiffusion, TextEncoder, UNetConfig};
use crate::autoencoder::AutoencoderConfig;
use crate::tensor_file::TensorFile;
use crate::weights::{self, LoadError};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";
pub const AUTOENCODER_PREFIX: &str = "first_stage_model.";

/// Keys LDM saves beside the weights: the DDPM noise schedule (SD 1.5's, which the built-in
/// scheduler config already is) and the EMA bookkeeping.
const SCHEDULE_BUFFERS: [&str; 15] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
];

/// How many names of each kind an error lists.
const LISTED: usize = 8;

/// Where a single file's architecture and tokenizer come from.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers SD directory whose `unet/`, `text_encoder/` and `vae/` configs (and
    /// `scheduler/`, `tokenizer/` when present) describe the checkpoint; SD 1.5 when `None`.
    pub config: Option<PathBuf>,
    /// A tokenizer folder (or a pipeline folder with `tokenizer/`); default: the config's.
    pub tokenizer: Option<PathBuf>,
}

/// The networks' configurations.
#[derive(Debug, Clone)]
pub struct Architecture {
    pub unet: UNetConfig,
    pub clip: ClipConfig,
    pub scheduler: SchedulerConfig,
    /// Pixels per latent pixel, from the VAE's levels.
    pub latent_factor: usize,
}

impl Architecture {
    /// Stable Diffusion 1.5 (the configs of stable-diffusion-v1-5's `unet/`, `text_encoder/`
    /// — CLIP ViT-L/14's text tower — `scheduler/` and `vae/`).
    pub fn sd15() -> Self {
        let unet = serde_json::from_str(
            r#"{"block_out_channels":[320,640,1280,1280],"cross_attention_dim":768,"attention_head_dim":8,"layers_per_block":2,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#,
        )
        .expect("valid SD 1.5 UNet config");
        let clip = serde_json::from_str(
            r#"{"vocab_size":49408,"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,"num_hidden_layers":12,
            "max_position_embeddings":77,"hidden_act":"quick_gelu","projection_dim":768}"#,
        )
        .expect("valid SD 1.5 CLIP config");
        Self { unet, clip, scheduler: SchedulerConfig::default(), latent_factor: AutoencoderConfig::sd15().downscale() }
    }

    /// The configs of a diffusers SD directory: `unet/config.json`, `text_encoder/config.json`
    /// and `vae/config.json` must be there; `scheduler/scheduler_config.json` is SD 1.5's if absent.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let missing: Vec<String> = ["unet/config.json", "text_encoder/config.json", "vae/config.json"]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .map(String::from)
            .collect();
        if !missing.is_empty() {
            return Err(LoadError::MissingFiles { dir: dir.into(), files: missing });
        }
        let vae: AutoencoderConfig = weights::read_json(&dir.join("vae/config.json"))?;
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        Ok(Self {
            unet: weights::read_json(&dir.join("unet/config.json"))?,
            clip: weights::read_json(&dir.join("text_encoder/config.json"))?,
            scheduler: if scheduler_path.is_file() { weights::read_json(&scheduler_path)? } else { SchedulerConfig::default() },
            latent_factor: vae.downscale(),
        })
    }
}

/// What each key of a single file is for.
#[derive(Debug, Default, PartialEq)]
pub struct KeyPlan {
    /// (key in the file, diffusers UNet name)
    pub unet: Vec<(String, String)>,
    /// (key in the file, transformers name `text_model.…`)
    pub text: Vec<(String, String)>,
    /// Keys under `first_stage_model.`: the autoencoder's, read by its own loader.
    pub autoencoder: usize,
    /// Known non-weights: schedule buffers, the EMA copy, CLIP's position ids.
    pub ignored: Vec<String>,
    /// Keys that are none of the above.
    pub unexpected: Vec<String>,
}

/// Sorts the keys of a single file by what they are for.
pub fn plan_keys<'a>(keys: impl IntoIterator<Item = &'a str>, layers_per_block: usize) -> KeyPlan {
    let mut plan = KeyPlan::default();
    for key in keys {
        if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            match unet_keys::rename(rest, layers_per_block) {
                Some(name) => plan.unet.push((key.to_string(), name)),
                None => plan.unexpected.push(key.to_string()),
            }
        } else if let Some(rest) = key.strip_prefix(TEXT_PREFIX) {
            // transformers before 4.x saved CLIPTextModel without the `text_model.` level.
            let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
            if rest == "embeddings.position_ids" {
                plan.ignored.push(key.to_string());
            } else {
                plan.text.push((key.to_string(), format!("text_model.{rest}")));
            }
        } else if key.starts_with(AUTOENCODER_PREFIX) {
            plan.autoencoder += 1;
        } else if SCHEDULE_BUFFERS.contains(&key) || key.starts_with("model_ema.") {
            plan.ignored.push(key.to_string());
        } else {
            plan.unexpected.push(key.to_string());
        }
    }
    plan
}

/// Compares the file's shapes (under the model's names) with what the model needs; a 1×1
/// conv weight where the model has a linear one (`use_linear_projection`) is accepted.
fn compare(
    part: &str,
    mapped: &[(String, String)],
    file_shapes: &BTreeMap<String, Vec<usize>>,
    expected: &BTreeMap<String, Vec<usize>>,
    problems: &mut Vec<String>,
) {
    let by_name: HashMap<&str, &str> = mapped.iter().map(|(file, name)| (name.as_str(), file.as_str())).collect();
    let missing: Vec<String> = expected.keys().filter(|n| !by_name.contains_key(n.as_str())).cloned().collect();
    let unexpected: Vec<String> =
        mapped.iter().filter(|(_, name)| !expected.contains_key(name)).map(|(file, _)| file.clone()).collect();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(name, want)| {
            let file = by_name.get(name.as_str())?;
            let got = &file_shapes[*file];
            (!same_or_squeezable(got, want)).then(|| format!("{file} (expected {want:?}, found {got:?})"))
        })
        .collect();
    list(problems, &format!("{part} tensors missing (diffusers names)"), missing);
    list(problems, &format!("unexpected {part} keys"), unexpected);
    list(problems, &format!("{part} tensors with a wrong shape"), wrong);
}

fn same_or_squeezable(got: &[usize], want: &[usize]) -> bool {
    got == want || (got.len() == 4 && want.len() == 2 && got[..2] == *want && got[2..] == [1, 1])
}

fn list(problems: &mut Vec<String>, what: &str, mut items: Vec<String>) {
    if items.is_empty() {
        return;
    }
    items.sort();
    let more = items.len().saturating_sub(LISTED);
    let mut line = format!("{} {what}: {}", items.len(), items[..items.len().min(LISTED)].join(", "));
    if more > 0 {
        line.push_str(&format!(" (and {more} more)"));
    }
    problems.push(line);
}

/// Why the file is not an SD 1.x checkpoint, when its keys say so.
fn other_model_hint(unexpected: &[String]) -> Option<&'static str> {
    if unexpected.iter().any(|k| k.starts_with("conditioner.embedders.")) {
        Some("this looks like an SDXL checkpoint; only SD 1.x single files are supported")
    } else if unexpected.iter().any(|k| k.starts_with("cond_stage_model.model.")) {
        Some("this looks like an SD 2.x checkpoint (OpenCLIP text encoder); only SD 1.x single files are supported")
    } else {
        None
    }
}

/// Loads the tensors of `mapped` under their model names (1×1 convs squeezed where needed).
fn load_mapped(
    file: &TensorFile,
    mapped: &[(String, String)],
    expected: &BTreeMap<String, Vec<usize>>,
) -> Result<HashMap<String, Tensor>, LoadError> {
    let mut out = HashMap::with_capacity(mapped.len());
    for (key, name) in mapped {
        let mut tensor = file.load(key)?;
        if tensor.dims() != expected[name].as_slice() {
            tensor = tensor
                .reshape(expected[name].as_slice())
                .map_err(|source| LoadError::Candle { context: format!("{}: `{key}`", file.path().display()), source })?;
        }
        out.insert(name.clone(), tensor);
    }
    Ok(out)
}

impl StableDiffusion {
    /// Loads a single-file SD 1.x checkpoint (see the [module docs](self)).
    pub fn load_single_file(path: &Path, single: &SingleFileOptions, options: &LoadOptions) -> Result<Self, LoadError> {
        let tokenizer_dir = single.tokenizer.clone().or_else(|| single.config.clone()).ok_or_else(|| LoadError::Config {
            path: path.into(),
            message: "a single-file checkpoint has no tokenizer: give `tokenizer` (the `tokenizer/` folder of \
                      stable-diffusion-v1-5, or of openai/clip-vit-large-patch14) or `config` (a diffusers SD directory)"
                .into(),
        })?;
        let arch = match &single.config {
            Some(dir) => Architecture::from_dir(dir)?,
            None => Architecture::sd15(),
        };
        let file = TensorFile::open(path)?;
        let source = path.display().to_string();
        let config_error = |message: String| LoadError::Config { path: path.into(), message };
        let unet_config = arch.unet.to_candle().map_err(|m| config_error(format!("UNet config: {m}")))?;
        let clip_config = arch.clip.to_candle().map_err(|m| config_error(format!("text encoder config: {m}")))?;
        let (in_channels, out_channels) = (arch.unet.in_channels, arch.unet.out_channels);
        let candle = |e: candle_core::Error| LoadError::Candle { context: source.clone(), source: e };
        let unet_expected =
            weights::expected_shapes(|vb| UNet2DConditionModel::new(vb, in_channels, out_channels, false, unet_config.clone())).map_err(candle)?;
        let text_expected = weights::expected_shapes(|vb| ClipTextTransformer::new(vb.pp("text_model"), &clip_config)).map_err(candle)?;

        let plan = plan_keys(file.shapes().keys().map(String::as_str), arch.unet.layers_per_block);
        let mut problems = Vec::new();
        if let Some(hint) = other_model_hint(&plan.unexpected) {
            problems.push(hint.to_string());
        }
        list(&mut problems, "keys of no SD 1.x part", plan.unexpected.clone());
        compare("UNet", &plan.unet, file.shapes(), &unet_expected, &mut problems);
        compare("text encoder", &plan.text, file.shapes(), &text_expected, &mut problems);
        if !problems.is_empty() {
            return Err(LoadError::Weights { source_name: source, problems });
        }
        tracing::info!(
            path = %path.display(),
            unet = plan.unet.len(),
            text_encoder = plan.text.len(),
            autoencoder = plan.autoencoder,
            ignored = plan.ignored.len(),
            "single-file checkpoint: keys by part (autoencoder keys are read by the autoencoder's loader; ignored: schedule buffers, EMA copy, position ids)"
        );

        let text_tensors = load_mapped(&file, &plan.text, &text_expected)?;
        let text_encoder = TextEncoder::build(&arch.clip, &text_tensors, &source, options.dtype, &options.device)?;
        drop(text_tensors);
        let tokenizer = super::tokenizer_for(&tokenizer_dir, &arch.clip, &text_encoder)?;
        let unet_tensors = super::fuse_loras(load_mapped(&file, &plan.unet, &unet_expected)?, &options.loras)?;
        let unet = super::unet::build_unet(&arch.unet, &unet_tensors, &source, options.dtype, &options.device)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            unet_config: arch.unet,
            scheduler_config: arch.scheduler,
            latent_factor: arch.latent_factor,
            device: options.device.clone(),
            dtype: options.dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_by_part() {
        let keys = [
            "model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "cond_stage_model.transformer.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
            "first_stage_model.decoder.conv_in.weight",
            "alphas_cumprod",
            "model_ema.diffusion_modelinput_blocks00weight",
            "model.diffusion_model.label_emb.0.weight",
            "lora_unet_down.alpha",
        ];
        let plan = plan_keys(keys, 2);
        assert_eq!(plan.unet, vec![(keys[0].to_string(), "conv_in.weight".to_string())]);
        assert_eq!(
            plan.text,
            vec![
                (keys[1].to_string(), "text_model.final_layer_norm.weight".to_string()),
                (keys[2].to_string(), "text_model.embeddings.token_embedding.weight".to_string())
            ]
        );
        assert_eq!(plan.autoencoder, 1);
        assert_eq!(plan.ignored, vec![keys[3].to_string(), keys[5].to_string(), keys[6].to_string()]);
        assert_eq!(plan.unexpected, vec![keys[7].to_string(), keys[8].to_string()]);
    }

    #[test]
    fn sd15_architecture_builds_the_sd15_shapes() {
        let arch = Architecture::sd15();
        let unet_config = arch.unet.to_candle().unwrap();
        let shapes = weights::expected_shapes(|vb| UNet2DConditionModel::new(vb, 4, 4, false, unet_config)).unwrap();
        assert_eq!(shapes.len(), 686, "SD 1.5's UNet has 686 tensors");
        assert_eq!(shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"], vec![320, 768]);
        let clip = arch.clip.to_candle().unwrap();
        let shapes = weights::expected_shapes(|vb| ClipTextTransformer::new(vb.pp("text_model"), &clip)).unwrap();
        assert_eq!(shapes.len(), 196, "CLIP ViT-L/14's text tower has 196 tensors");
        assert_eq!(arch.latent_factor, 8);
    }

    #[test]
    fn other_models_and_a_missing_tokenizer_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sdxl.safetensors");
        let t = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("conditioner.embedders.0.transformer.x".to_string(), t)]), &path).unwrap();
        let options = LoadOptions::default();
        let err = StableDiffusion::load_single_file(&path, &SingleFileOptions::default(), &options).err().unwrap().to_string();
        assert!(err.contains("no tokenizer") && err.contains("`tokenizer`"), "{err}");
        let single = SingleFileOptions { tokenizer: Some(dir.path().into()), config: None };
        let err = StableDiffusion::load_single_file(&path, &single, &options).err().unwrap().to_string();
        assert!(err.contains("sdxl.safetensors") && err.contains("SDXL"), "{err}");
        assert!(err.contains("686 UNet tensors missing"), "{err}");
    }
}

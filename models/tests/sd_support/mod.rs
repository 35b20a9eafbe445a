//! Shared helpers of the `sd_*` / `golden_sd` tests: where the golden files are, and how to
//! write them out as a diffusers-format model directory (tests cannot download anything).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use fmboost_models::golden::GoldenFile;

/// `$FMBOOST_GOLDEN_DIR`, else `<workspace>/../shared/golden`. Panics (never skips) if missing.
pub fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("FMBOOST_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden"));
    dir.canonicalize().unwrap_or_else(|e| panic!("golden directory {} is missing: {e}", dir.display()))
}

/// A model directory of `<golden>/../fixtures` (diffusers pipelines as users have them; see its
/// README). Panics (never skips) if missing.
pub fn fixture(name: &str) -> PathBuf {
    let dir = golden_dir().join("../fixtures").join(name);
    dir.canonicalize().unwrap_or_else(|e| panic!("fixture {} is missing: {e}", dir.display()))
}

pub fn golden(name: &str) -> GoldenFile {
    let path = golden_dir().join(name);
    GoldenFile::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// A word-level CLIP-style tokenizer.json over `vocab_size` ids: `w<i>` words, start/end
/// tokens at the top of the vocabulary, added by a template post-processor as CLIP's does.
pub fn tokenizer_json(vocab_size: usize) -> serde_json::Value {
    let (bos, eos) = (vocab_size - 2, vocab_size - 1);
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    for i in 1..bos {
        vocab.insert(format!("w{i}"), i.into());
    }
    vocab.insert("<|startoftext|>".into(), bos.into());
    vocab.insert("<|endoftext|>".into(), eos.into());
    let added = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let special = |content: &str, id: usize| serde_json::json!({"id": content, "ids": [id], "tokens": [content]});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(bos, "<|startoftext|>"), added(eos, "<|endoftext|>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|startoftext|>": special("<|startoftext|>", bos), "<|endoftext|>": special("<|endoftext|>", eos)}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes the tiny golden models as a diffusers directory under `dir`:
/// unet/, vae/, text_encoder/ (config.json + safetensors), tokenizer/tokenizer.json and
/// scheduler/scheduler_config.json (the golden DDIM settings).
pub fn write_tiny_sd_dir(dir: &Path) {
    let unet = golden("sd_unet_tiny.safetensors");
    let vae = golden("sd_vae_tiny.safetensors");
    let clip = golden("clip_text_tiny.safetensors");
    let loops = golden("sd_loops_tiny.safetensors");
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let strip = |file: &GoldenFile, prefix: &str| -> HashMap<String, Tensor> {
        file.tensors.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect()
    };
    save(&strip(&unet, "unet."), &dir.join("unet/diffusion_pytorch_model.safetensors"));
    std::fs::write(dir.join("unet/config.json"), &unet.metadata["config"]).unwrap();
    save(&strip(&vae, "vae."), &dir.join("vae/diffusion_pytorch_model.safetensors"));
    std::fs::write(dir.join("vae/config.json"), &vae.metadata["config"]).unwrap();
    let text: HashMap<String, Tensor> = clip.tensors.iter().filter(|(k, _)| k.starts_with("text_model.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    save(&text, &dir.join("text_encoder/model.safetensors"));
    std::fs::write(dir.join("text_encoder/config.json"), &clip.metadata["config"]).unwrap();
    let clip_config: serde_json::Value = serde_json::from_str(&clip.metadata["config"]).unwrap();
    write_json(&dir.join("tokenizer/tokenizer.json"), &tokenizer_json(clip_config["vocab_size"].as_u64().unwrap() as usize));
    std::fs::write(dir.join("scheduler/scheduler_config.json"), &loops.metadata["ddim"]).unwrap();
}

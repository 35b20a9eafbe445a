//! LoRA fusion at load time (how LCM-LoRA is distributed): for each adapted layer,
//! `W ← W + scale · (alpha / rank) · up · down`, with up/down reshaped for convolutions.
//!
//! Key layouts understood (after an optional `unet.` / `base_model.model.` prefix):
//! - kohya: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`
//! - PEFT / diffusers: `<module>.lora_A.weight`, `<module>.lora_B.weight`
//! - diffusers (older): `<module>.lora.down.weight`, `<module>.lora.up.weight`, and the
//!   attention-processor form `<attn>.processor.to_q_lora.down.weight`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};

use crate::weights::LoadError;

#[derive(Default)]
struct Pair {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// The adapted module and which part a LoRA key is, or `None` for a key of no known layout.
fn parse_key(key: &str) -> Option<(String, &'static str)> {
    let key = key.strip_prefix("unet.").or_else(|| key.strip_prefix("base_model.model.")).unwrap_or(key);
    if let Some(rest) = key.strip_prefix("lora_unet_") {
        for (suffix, part) in [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")] {
            if let Some(module) = rest.strip_suffix(suffix) {
                return Some((format!("kohya:{module}"), part));
            }
        }
        return None;
    }
    for (suffix, part) in [
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".alpha", "alpha"),
    ] {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((module.to_string(), part));
        }
    }
    // `attn1.processor.to_q_lora.down.weight` → `attn1.to_q`; `to_out_lora` → `to_out.0`.
    let (attn, rest) = key.split_once(".processor.")?;
    let (proj, part) = rest.strip_suffix("_lora.down.weight").map(|p| (p, "down")).or_else(|| rest.strip_suffix("_lora.up.weight").map(|p| (p, "up")))?;
    let proj = if proj == "to_out" { "to_out.0" } else { proj };
    Some((format!("{attn}.{proj}"), part))
}

/// Fuses `lora` into `weights` (diffusers UNet names, no prefix) with `scale`. Every LoRA key
/// must land on a weight: unknown keys, half pairs and size mismatches are one error naming
/// them. Returns the number of fused layers.
pub fn fuse(weights: &mut HashMap<String, Tensor>, lora: &HashMap<String, Tensor>, scale: f64, source_name: &str) -> Result<usize, LoadError> {
    // kohya flattens dots into underscores; map back through the model's own module names.
    let kohya_names: HashMap<String, String> = weights
        .keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .map(|m| (m.replace('.', "_"), m.to_string()))
        .collect();
    let mut problems = Vec::new();
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    for (key, tensor) in lora {
        let Some((module, part)) = parse_key(key) else {
            problems.push(format!("`{key}` is not a UNet LoRA key of a known layout"));
            continue;
        };
        let module = match module.strip_prefix("kohya:") {
            Some(flat) => match kohya_names.get(flat) {
                Some(m) => m.clone(),
                None => {
                    problems.push(format!("`{key}` names no layer of the UNet"));
                    continue;
                }
            },
            None => module,
        };
        let pair = pairs.entry(module).or_default();
        match part {
            "down" => pair.down = Some(tensor.clone()),
            "up" => pair.up = Some(tensor.clone()),
            _ => match tensor.to_dtype(DType::F64).and_then(|t| t.flatten_all()?.to_vec1::<f64>()) {
                Ok(v) if v.len() == 1 => pair.alpha = Some(v[0]),
                _ => problems.push(format!("`{key}` is not a scalar alpha")),
            },
        }
    }
    let mut fused = Vec::new();
    for (module, pair) in &pairs {
        let (Some(down), Some(up)) = (&pair.down, &pair.up) else {
            problems.push(format!("LoRA for `{module}` lacks its {} matrix", if pair.down.is_none() { "down" } else { "up" }));
            continue;
        };
        let target = format!("{module}.weight");
        let Some(weight) = weights.get(&target) else {
            problems.push(format!("LoRA targets `{target}`, which the UNet does not have"));
            continue;
        };
        match merged(weight, down, up, pair.alpha, scale) {
            Ok(w) => fused.push((target, w)),
            Err(e) => problems.push(format!("LoRA for `{module}`: {e}")),
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(LoadError::Weights { source_name: source_name.into(), problems });
    }
    let count = fused.len();
    weights.extend(fused);
    Ok(count)
}

/// `weight + scale · alpha/rank · up·down`, computed in f32 and stored in the weight's dtype.
fn merged(weight: &Tensor, down: &Tensor, up: &Tensor, alpha: Option<f64>, scale: f64) -> candle_core::Result<Tensor> {
    let rank = down.dim(0)?;
    if up.rank() < 2 || up.dim(1)? != rank {
        candle_core::bail!("up {:?} and down {:?} disagree on the rank", up.dims(), down.dims());
    }
    let up2 = up.to_dtype(DType::F32)?.flatten_from(1)?;
    let down2 = down.to_dtype(DType::F32)?.flatten_from(1)?;
    let delta = up2.matmul(&down2)?;
    if delta.elem_count() != weight.elem_count() {
        candle_core::bail!("delta {:?} does not fit weight {:?}", delta.dims(), weight.dims());
    }
    let factor = scale * alpha.unwrap_or(rank as f64) / rank as f64;
    let w = (weight.to_dtype(DType::F32)? + (delta.reshape(weight.shape())? * factor)?)?;
    w.to_dtype(weight.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_layouts_to_the_same_module() {
        let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(parse_key(&format!("unet.{m}.lora_A.weight")), Some((m.into(), "down")));
        assert_eq!(parse_key(&format!("{m}.lora.up.weight")), Some((m.into(), "up")));
        assert_eq!(
            parse_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"),
            Some((m.into(), "down"))
        );
        assert_eq!(
            parse_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"),
            Some(("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0".into(), "up"))
        );
        assert_eq!(parse_key(&format!("lora_unet_{}.alpha", m.replace('.', "_"))).unwrap().1, "alpha");
        assert_eq!(parse_key("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"), None);
    }
}

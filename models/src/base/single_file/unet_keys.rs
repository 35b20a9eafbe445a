//! The LDM (CompVis) UNet's key names → diffusers' (which candle-transformers' UNet uses), as
//! diffusers' `convert_ldm_unet_checkpoint` renames them.
//!
//! LDM numbers its blocks flat: `input_blocks.0` is `conv_in`, then each down level has
//! `layers_per_block` (resnet, attention) entries and, except the last, one downsampler;
//! each up level has `layers_per_block + 1` entries, the level's upsampler inside its last one.
//! Inside a block only the resnet's names change; attention (`SpatialTransformer`) names
//! are the same in both.

/// The diffusers name of the LDM UNet key `key` (without `model.diffusion_model.`), or `None`
/// when the key is no part of an SD UNet.
pub fn rename(key: &str, layers_per_block: usize) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    let per_level = layers_per_block + 1;
    let joined = |rest: &[&str]| rest.join(".");
    Some(match parts.as_slice() {
        ["time_embed", "0", param] => format!("time_embedding.linear_1.{param}"),
        ["time_embed", "2", param] => format!("time_embedding.linear_2.{param}"),
        ["input_blocks", "0", "0", param] => format!("conv_in.{param}"),
        ["out", "0", param] => format!("conv_norm_out.{param}"),
        ["out", "2", param] => format!("conv_out.{param}"),
        ["input_blocks", index, layer, rest @ ..] => {
            let index: usize = index.parse().ok()?;
            let (level, within) = ((index.checked_sub(1)?) / per_level, (index - 1) % per_level);
            match (*layer, rest) {
                ("0", ["op", param]) if within == layers_per_block => format!("down_blocks.{level}.downsamplers.0.conv.{param}"),
                ("0", rest) if within < layers_per_block => format!("down_blocks.{level}.resnets.{within}.{}", resnet(rest)?),
                ("1", rest) if within < layers_per_block && !rest.is_empty() => {
                    format!("down_blocks.{level}.attentions.{within}.{}", joined(rest))
                }
                _ => return None,
            }
        }
        ["middle_block", "0", rest @ ..] => format!("mid_block.resnets.0.{}", resnet(rest)?),
        ["middle_block", "1", rest @ ..] if !rest.is_empty() => format!("mid_block.attentions.0.{}", joined(rest)),
        ["middle_block", "2", rest @ ..] => format!("mid_block.resnets.1.{}", resnet(rest)?),
        ["output_blocks", index, layer, rest @ ..] => {
            let index: usize = index.parse().ok()?;
            let (level, within) = (index / per_level, index % per_level);
            match (*layer, rest) {
                // The upsampler sits after the resnet (level without attention) or after both.
                ("1" | "2", ["conv", param]) if within == layers_per_block => format!("up_blocks.{level}.upsamplers.0.conv.{param}"),
                ("0", rest) => format!("up_blocks.{level}.resnets.{within}.{}", resnet(rest)?),
                ("1", rest) if !rest.is_empty() => format!("up_blocks.{level}.attentions.{within}.{}", joined(rest)),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// An LDM `ResBlock`'s inner names → diffusers' `ResnetBlock2D`'s.
fn resnet(rest: &[&str]) -> Option<String> {
    let (layer, param) = match rest {
        [a, b, param] => (format!("{a}.{b}"), *param),
        [a, param] => (a.to_string(), *param),
        _ => return None,
    };
    let renamed = match layer.as_str() {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{renamed}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::rename;

    #[test]
    fn sd15_layout_maps_as_diffusers_maps_it() {
        // SD 1.5: layers_per_block 2, so input_blocks 1-2 are level 0, 3 its downsampler,
        // output_blocks 0-2 level 0 (no attention: upsampler at .1), 3-5 level 1 (at .2).
        let cases = [
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            ("input_blocks.2.0.emb_layers.1.weight", "down_blocks.0.resnets.1.time_emb_proj.weight"),
            ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.4.0.skip_connection.bias", "down_blocks.1.resnets.0.conv_shortcut.bias"),
            ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
            ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.5.1.norm.weight", "up_blocks.1.attentions.2.norm.weight"),
            ("output_blocks.11.0.in_layers.0.bias", "up_blocks.3.resnets.2.norm1.bias"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(rename(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
    }

    #[test]
    fn keys_outside_the_layout_are_not_renamed() {
        for key in ["input_blocks.3.0.in_layers.0.weight", "input_blocks.1.0.op.weight", "output_blocks.1.2.conv.weight", "label_emb.0.weight", "middle_block.1"] {
            assert_eq!(rename(key, 2), None, "{key}");
        }
    }
}

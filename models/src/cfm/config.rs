//! The configuration of the paper's `EfficientUNet`, as the reference writes it (the JSON in the
//! golden files' `config` metadata round-trips through [`UNetConfig`]).

use serde::{Deserialize, Serialize};

/// Groups of every GroupNorm in the network (the reference hard-codes 32).
pub const NORM_GROUPS: usize = 32;

/// Hyper-parameters of the `EfficientUNet`. Unknown fields are rejected so that a knob we do
/// not know is an error, never ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Channels of the network input: x_t's channels plus the context's (8 = 4 + 4 for SD).
    pub in_channels: usize,
    /// Base channel count; level `i` has `model_channels · channel_mult[i]` channels.
    pub model_channels: usize,
    /// Channels of the predicted velocity.
    pub out_channels: usize,
    /// Residual blocks per level in the encoder (the decoder has one more).
    pub num_res_blocks: usize,
    /// Downsample rates (1, 2, 4, ...) at which encoder/decoder blocks get self-attention. A
    /// rate the network never reaches adds nothing, as in the reference (the paper's config
    /// lists 16 but its four levels stop at 8).
    pub attention_resolutions: Vec<usize>,
    /// Channel multiplier per level; `len()` levels, `len() − 1` downsamplings.
    pub channel_mult: Vec<usize>,
    /// Width of one attention head.
    pub dim_head: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Linear attention in the encoder/decoder blocks (the middle block always uses softmax).
    pub use_linear_attn: bool,
    /// ResBlocks modulate with GN(h)·(1 + scale) + shift instead of adding the embedding.
    pub use_scale_shift_norm: bool,
    /// Learned 3×3 convolutions for down/upsampling instead of avg-pool / nearest only.
    pub conv_resample: bool,
    /// Dropout before the second convolution of each ResBlock. Only 0 is supported.
    #[serde(default)]
    pub dropout: f64,
    /// The reference's optional Pool2d stem (`pool_factor > 1`). Its released config writes
    /// −1 (no pooling); only values ≤ 1 are supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_factor: Option<i64>,
}

impl UNetConfig {
    /// The paper's SD-latent upsampler: 8 → 4 channels, 128 base channels, mult [1, 2, 4, 8],
    /// 3 res blocks, attention at ×8 and ×16, 4 heads × 64, scale-shift norm, conv resampling.
    pub fn paper() -> Self {
        Self {
            in_channels: 8,
            model_channels: 128,
            out_channels: 4,
            num_res_blocks: 3,
            attention_resolutions: vec![8, 16],
            channel_mult: vec![1, 2, 4, 8],
            dim_head: 64,
            num_heads: 4,
            use_linear_attn: false,
            use_scale_shift_norm: true,
            conv_resample: true,
            dropout: 0.0,
            pool_factor: None,
        }
    }

    /// Parses and validates a JSON config.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let config: Self = serde_json::from_str(json).map_err(|e| format!("UNet config: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Channels of the timestep embedding (4 · model_channels).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Width of the attention's q, k and v (heads · dim_head).
    pub fn attention_inner_dim(&self) -> usize {
        self.num_heads * self.dim_head
    }

    /// How many times the network halves the resolution.
    pub fn downsamplings(&self) -> usize {
        self.channel_mult.len().saturating_sub(1)
    }

    /// Checks what the reference would only find out by crashing (or silently mis-building).
    pub fn validate(&self) -> Result<(), String> {
        let fail = |field: &str, why: String| Err(format!("UNet config `{field}`: {why}"));
        if self.in_channels == 0 {
            return fail("in_channels", "must be > 0".into());
        }
        if self.out_channels == 0 {
            return fail("out_channels", "must be > 0".into());
        }
        if self.model_channels == 0 || !self.model_channels.is_multiple_of(NORM_GROUPS) {
            return fail(
                "model_channels",
                format!("{} must be a positive multiple of {NORM_GROUPS} (GroupNorm groups)", self.model_channels),
            );
        }
        if self.channel_mult.is_empty() {
            return fail("channel_mult", "needs at least one level".into());
        }
        if self.channel_mult.contains(&0) {
            return fail("channel_mult", format!("{:?} contains 0", self.channel_mult));
        }
        if self.channel_mult[0] != 1 {
            // The reference's output head is GroupNorm(ch) then Conv(model_channels, ...), which
            // only fits when the first level keeps model_channels.
            return fail("channel_mult", format!("{:?}: the first multiplier must be 1", self.channel_mult));
        }
        if self.num_res_blocks == 0 {
            return fail("num_res_blocks", "must be > 0".into());
        }
        if self.num_heads == 0 || self.dim_head == 0 {
            return fail("num_heads/dim_head", format!("{} × {} must both be > 0", self.num_heads, self.dim_head));
        }
        if let Some(bad) = self.attention_resolutions.iter().find(|r| !r.is_power_of_two()) {
            return fail("attention_resolutions", format!("{bad} is not a downsample rate (1, 2, 4, ...)"));
        }
        if let Some(factor) = self.pool_factor.filter(|&f| f > 1) {
            return fail("pool_factor", format!("{factor}: the pooling stem is not implemented, only values ≤ 1 (no pooling)"));
        }
        if !(self.dropout == 0.0) {
            return fail(
                "dropout",
                format!("{} is not supported: this implementation has no dropout, only 0 is accepted", self.dropout),
            );
        }
        Ok(())
    }
}

/// A small config for unit tests: 4-channel latents, two levels, attention at rate 2.
#[cfg(test)]
pub(crate) fn tiny(use_linear_attn: bool) -> UNetConfig {
    UNetConfig {
        in_channels: 8,
        model_channels: 32,
        out_channels: 4,
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        channel_mult: vec![1, 2],
        dim_head: 16,
        num_heads: 2,
        use_linear_attn,
        use_scale_shift_norm: true,
        conv_resample: true,
        dropout: 0.0,
        pool_factor: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_json_round_trips() {
        let json = r#"{"in_channels": 12, "model_channels": 32, "out_channels": 4, "num_res_blocks": 2, "attention_resolutions": [2, 4], "channel_mult": [1, 2, 2], "dim_head": 8, "num_heads": 4, "use_linear_attn": true, "use_scale_shift_norm": true, "conv_resample": true, "dropout": 0.0}"#;
        let config = UNetConfig::from_json(json).unwrap();
        assert_eq!(config.channel_mult, vec![1, 2, 2]);
        let again = UNetConfig::from_json(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn released_config_with_pool_factor_minus_one_is_the_paper_config() {
        let mut value = serde_json::to_value(UNetConfig::paper()).unwrap();
        assert!(value.get("pool_factor").is_none(), "absent stays absent when written back");
        value["pool_factor"] = (-1).into();
        let config = UNetConfig::from_json(&value.to_string()).unwrap();
        assert_eq!(config, UNetConfig { pool_factor: Some(-1), ..UNetConfig::paper() });
        value["pool_factor"] = 2.into();
        let err = UNetConfig::from_json(&value.to_string()).unwrap_err();
        assert!(err.contains("pool_factor") && err.contains("not implemented"), "{err}");
    }

    #[test]
    fn rejects_unknown_knobs_and_bad_values() {
        let mut value = serde_json::to_value(UNetConfig::paper()).unwrap();
        value["use_fp16"] = true.into();
        let err = UNetConfig::from_json(&value.to_string()).unwrap_err();
        assert!(err.contains("use_fp16"), "{err}");

        let mut config = UNetConfig::paper();
        config.dropout = 0.1;
        assert!(config.validate().unwrap_err().contains("dropout"));
        let mut config = UNetConfig::paper();
        config.model_channels = 48;
        assert!(config.validate().unwrap_err().contains("model_channels"));
        let mut config = UNetConfig::paper();
        config.channel_mult = vec![2, 4];
        assert!(config.validate().unwrap_err().contains("channel_mult"));
        let mut config = UNetConfig::paper();
        config.attention_resolutions = vec![3];
        assert!(config.validate().unwrap_err().contains("attention_resolutions"));
    }
}

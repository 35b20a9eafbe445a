//! The block layout of the `EfficientUNet`, derived once from the config. The network builder
//! and the cost model both walk this plan, so the two can never disagree.

use super::config::UNetConfig;

/// One entry of `input_blocks` after the stem convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputBlock {
    /// ResBlock `in_ch → out_ch`, optionally followed by self-attention.
    Res { in_ch: usize, out_ch: usize, attention: bool, downsample_rate: usize },
    /// Halves the resolution (stride-2 conv or 2×2 average pool).
    Down { ch: usize, downsample_rate: usize },
}

/// One entry of `output_blocks`: ResBlock on cat[h, skip], optional attention, optional upsample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputBlock {
    pub in_ch: usize,
    pub out_ch: usize,
    pub attention: bool,
    pub upsample: bool,
    /// Rate at which the ResBlock and attention run (the upsample doubles it back).
    pub downsample_rate: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub input: Vec<InputBlock>,
    /// Channels (and rate) of the middle block.
    pub middle_ch: usize,
    pub middle_rate: usize,
    pub output: Vec<OutputBlock>,
}

impl Plan {
    /// Mirrors the reference constructor loop by loop.
    pub fn new(cfg: &UNetConfig) -> Self {
        let mc = cfg.model_channels;
        let mut input = Vec::new();
        let mut skip_chans = vec![mc];
        let mut ch = mc;
        let mut ds = 1;
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let out_ch = mult * mc;
                input.push(InputBlock::Res {
                    in_ch: ch,
                    out_ch,
                    attention: cfg.attention_resolutions.contains(&ds),
                    downsample_rate: ds,
                });
                ch = out_ch;
                skip_chans.push(ch);
            }
            if level + 1 != cfg.channel_mult.len() {
                input.push(InputBlock::Down { ch, downsample_rate: ds });
                skip_chans.push(ch);
                ds *= 2;
            }
        }
        let (middle_ch, middle_rate) = (ch, ds);
        let mut output = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let skip = skip_chans.pop().expect("one skip per input block");
                let out_ch = mc * mult;
                let upsample = level > 0 && i == cfg.num_res_blocks;
                output.push(OutputBlock {
                    in_ch: ch + skip,
                    out_ch,
                    attention: cfg.attention_resolutions.contains(&ds),
                    upsample,
                    downsample_rate: ds,
                });
                ch = out_ch;
                if upsample {
                    ds /= 2;
                }
            }
        }
        Self { input, middle_ch, middle_rate, output }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_case_a_layout() {
        // cfm_unet_a: mult [1, 2], 1 res block, attention at rate 2.
        let cfg = UNetConfig::from_json(r#"{"in_channels": 8, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1, "attention_resolutions": [2], "channel_mult": [1, 2], "dim_head": 16, "num_heads": 2, "use_linear_attn": false, "use_scale_shift_norm": true, "conv_resample": true, "dropout": 0.0}"#).unwrap();
        let plan = Plan::new(&cfg);
        assert_eq!(
            plan.input,
            vec![
                InputBlock::Res { in_ch: 32, out_ch: 32, attention: false, downsample_rate: 1 },
                InputBlock::Down { ch: 32, downsample_rate: 1 },
                InputBlock::Res { in_ch: 32, out_ch: 64, attention: true, downsample_rate: 2 },
            ]
        );
        assert_eq!((plan.middle_ch, plan.middle_rate), (64, 2));
        let ins: Vec<_> = plan.output.iter().map(|b| (b.in_ch, b.out_ch, b.attention, b.upsample)).collect();
        // Matches the golden keys: output_blocks.0.0 skip 128→64, .1.0 96→64 with .1.2 upsample
        // conv, .2.0 96→32, .3.0 64→32.
        assert_eq!(ins, vec![(128, 64, true, false), (96, 64, true, true), (96, 32, false, false), (64, 32, false, false)]);
    }
}

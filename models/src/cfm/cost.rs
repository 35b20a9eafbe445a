//! Analytic cost of one network evaluation: floating-point operations counted from the config
//! (2 per multiply-add of every convolution, linear layer and attention matmul; norms,
//! activations, biases and additions are left out, they are memory-bound and small).

use super::config::UNetConfig;
use super::plan::{InputBlock, Plan};

/// FLOPs of one `EfficientUNet` forward on a batch of `batch` inputs of `h`×`w`.
pub fn flops_per_forward(config: &UNetConfig, batch: usize, h: usize, w: usize) -> u64 {
    let plan = Plan::new(config);
    let b = batch as u64;
    let pixels = |rate: usize| ((h / rate) * (w / rate)) as u64;
    let conv = |c_in: usize, c_out: usize, k: u64, out_pixels: u64| 2 * b * c_in as u64 * c_out as u64 * k * k * out_pixels;
    let emb = config.time_embed_dim() as u64;
    let res_block = |c_in: usize, c_out: usize, rate: usize| {
        let p = pixels(rate);
        let emb_out = if config.use_scale_shift_norm { 2 * c_out } else { c_out } as u64;
        let skip = if c_in == c_out { 0 } else { conv(c_in, c_out, 1, p) };
        conv(c_in, c_out, 3, p) + conv(c_out, c_out, 3, p) + skip + 2 * b * emb * emb_out
    };
    let heads = config.num_heads as u64;
    let dh = config.dim_head as u64;
    let inner = heads * dh;
    let attention = |ch: usize, rate: usize, linear: bool| {
        let l = pixels(rate);
        let projections = 2 * b * l * ch as u64 * 3 * inner + 2 * b * l * inner * ch as u64;
        // softmax: QKᵀ and AV, each L·L·dh per head; linear: KᵀV and Q·ctx, each L·dh·dh.
        let mixing = if linear { 2 * (2 * b * heads * l * dh * dh) } else { 2 * (2 * b * heads * l * l * dh) };
        projections + mixing
    };

    let mc = config.model_channels;
    let mut total = 2 * b * (mc as u64 * emb + emb * emb); // time embedding
    total += conv(config.in_channels, mc, 3, pixels(1));
    for block in &plan.input {
        total += match *block {
            InputBlock::Res { in_ch, out_ch, attention: with_attention, downsample_rate } => {
                res_block(in_ch, out_ch, downsample_rate)
                    + if with_attention { attention(out_ch, downsample_rate, config.use_linear_attn) } else { 0 }
            }
            InputBlock::Down { ch, downsample_rate } => {
                if config.conv_resample {
                    conv(ch, ch, 3, pixels(downsample_rate * 2))
                } else {
                    0
                }
            }
        };
    }
    let (ch, rate) = (plan.middle_ch, plan.middle_rate);
    total += 2 * res_block(ch, ch, rate) + attention(ch, rate, false);
    for block in &plan.output {
        let rate = block.downsample_rate;
        total += res_block(block.in_ch, block.out_ch, rate);
        if block.attention {
            total += attention(block.out_ch, rate, config.use_linear_attn);
        }
        if block.upsample && config.conv_resample {
            total += conv(block.out_ch, block.out_ch, 3, pixels(rate / 2));
        }
    }
    total + conv(mc, config.out_channels, 3, pixels(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_with_batch_and_area() {
        let cfg = UNetConfig::paper();
        let one = flops_per_forward(&cfg, 1, 64, 64);
        assert_eq!(flops_per_forward(&cfg, 3, 64, 64), 3 * one);
        // Convolutions dominate, so 4× the pixels is a bit over 4× the FLOPs (attention is L²).
        let big = flops_per_forward(&cfg, 1, 128, 128) as f64 / one as f64;
        assert!((3.9..4.5).contains(&big), "{big}");
    }

    #[test]
    fn counts_a_single_level_by_hand() {
        // One level, one res block, no attention anywhere but the middle block.
        let cfg = UNetConfig {
            in_channels: 2,
            model_channels: 32,
            out_channels: 1,
            num_res_blocks: 1,
            attention_resolutions: vec![],
            channel_mult: vec![1],
            dim_head: 8,
            num_heads: 1,
            use_linear_attn: false,
            use_scale_shift_norm: false,
            conv_resample: true,
            dropout: 0.0,
            pool_factor: None,
        };
        let (p, c, e) = (16u64, 32u64, 128u64);
        let conv3 = |ci: u64, co: u64| 2 * ci * co * 9 * p;
        let res = |ci: u64| conv3(ci, c) + conv3(c, c) + if ci == c { 0 } else { 2 * ci * c * p } + 2 * e * c;
        let attn = 2 * p * c * 24 + 2 * p * 8 * c + 2 * (2 * p * p * 8);
        let want = 2 * (c * e + e * e) + conv3(2, c) + res(c) + 2 * res(c) + attn + res(2 * c) + res(2 * c) + conv3(c, 1);
        assert_eq!(flops_per_forward(&cfg, 1, 4, 4), want);
    }
}

//! The architectures of the tiny embedded chain: 64 px → 128 px → 256 px images, latents
//! 8² → 16² → 32², sized for training and sampling on a 2-core CPU.
//!
//! Parameter counts (f32 bytes): autoencoder 0.95 M (3.8 MB), base UNet and each hop UNet
//! ≈ 1.75 M (7 MB): ≈ 6.2 M parameters, ≈ 25 MB in all.

use crate::autoencoder::AutoencoderConfig;
use crate::cfm::UNetConfig;

/// Latent channels of the tiny autoencoder: 4, as SD's kl-f8, so the tiny chain runs exactly
/// the SD code path (8-channel CFM input), and the base generator has only 4·8·8 = 256 numbers
/// to make per 64 px image, which a small network learns in a CPU-sized budget. More channels
/// reconstruct better but make every latent model's job harder.
pub const TINY_LATENT_CHANNELS: usize = 4;

/// The tiny first stage: diffusers `AutoencoderKL` with four levels (f = 8), one ResNet block
/// per level, channels 16/32/64/64, GroupNorm with 8 groups (the channels are too few for 32).
/// No attention in the mid blocks: trained on small crops, a global attention does not carry
/// over to larger images (with it, a first run reconstructed 48 px crops at 27 dB but 256 px
/// crops at 18 dB with a green cast); fully convolutional, the network works at any size.
/// The scaling factor is measured after training (1 / std of the latents).
pub fn tiny_autoencoder() -> AutoencoderConfig {
    AutoencoderConfig {
        block_out_channels: vec![16, 32, 64, 64],
        layers_per_block: 1,
        latent_channels: TINY_LATENT_CHANNELS,
        norm_num_groups: 8,
        scaling_factor: 1.0,
        mid_block_add_attention: false,
        ..AutoencoderConfig::sd15()
    }
}

fn tiny_unet(in_channels: usize, attention_resolutions: Vec<usize>) -> UNetConfig {
    UNetConfig {
        in_channels,
        model_channels: 32,
        out_channels: TINY_LATENT_CHANNELS,
        num_res_blocks: 2,
        attention_resolutions,
        channel_mult: vec![1, 2, 2],
        dim_head: 32,
        num_heads: 2,
        use_linear_attn: false,
        use_scale_shift_norm: true,
        conv_resample: true,
        dropout: 0.0,
        pool_factor: None,
    }
}

/// A CFM hop: input cat[x_t, z_up] (8 channels), attention at the lowest level only.
pub fn tiny_hop_unet() -> UNetConfig {
    tiny_unet(2 * TINY_LATENT_CHANNELS, vec![4])
}

/// The base generator (no context): the same network on 8² latents, attention at 4² and 2².
pub fn tiny_base_unet() -> UNetConfig {
    tiny_unet(TINY_LATENT_CHANNELS, vec![2, 4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cfm::parameter_count;

    #[test]
    fn presets_are_valid_and_fit_the_size_budget() {
        tiny_autoencoder().validate().unwrap();
        assert_eq!(tiny_autoencoder().downscale(), 8);
        let unets = parameter_count(&tiny_hop_unet()).unwrap() * 2 + parameter_count(&tiny_base_unet()).unwrap();
        // The autoencoder is < 1 M parameters; all weights together must stay ≤ 30 MB in f32.
        assert!((unets + 1_000_000) * 4 <= 30_000_000, "{unets}");
    }
}

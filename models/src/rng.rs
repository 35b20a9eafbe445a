//! Seeded noise, drawn on the CPU in a fixed order and then moved to the device.
//!
//! Every random draw of a job comes from a stream keyed by (job seed, stage, hop), so the
//! same spec gives bit-identical output in one process or through the cluster, whatever the
//! batching: a batch of jobs draws each job's noise from its own stream and stacks it.

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Which part of the pipeline a noise stream belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Base stage: initial latent noise and any scheduler noise.
    Base,
    /// CFM hop `n` (0-based): the ε of the noise augmentation.
    Cfm(u32),
    /// Training data order and noise.
    Train,
    /// Initial weights of a network to train (one stream per parameter name).
    Init,
}

impl Stream {
    fn tag(self) -> u64 {
        match self {
            Stream::Base => 0x0100_0000,
            Stream::Cfm(hop) => 0x0200_0000 | hop as u64,
            Stream::Train => 0x0300_0000,
            Stream::Init => 0x0400_0000,
        }
    }
}

/// SplitMix64 finaliser: a fixed, well-mixed 64-bit hash (never changes across releases,
/// unlike `std`'s hashers).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic RNG for (seed, stream).
pub fn rng_for(seed: u64, stream: Stream) -> NoiseRng {
    NoiseRng(ChaCha8Rng::seed_from_u64(mix(mix(seed) ^ stream.tag())))
}

/// A seeded source of standard-normal tensors.
pub struct NoiseRng(ChaCha8Rng);

impl NoiseRng {
    /// Draws a standard-normal f32 tensor of `shape` on the CPU, then moves it to `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
    }

    /// A uniform f32 in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        use rand::Rng;
        self.0.random::<f32>()
    }

    /// The underlying RNG, for shuffles and other draws.
    pub fn inner(&mut self) -> &mut ChaCha8Rng {
        &mut self.0
    }
}

/// Draws one noise tensor per seed (each of `shape`) and stacks them on a new batch axis.
pub fn randn_batch(seeds: &[u64], stream: Stream, shape: &[usize], device: &Device) -> Result<Tensor> {
    let parts = seeds
        .iter()
        .map(|&s| rng_for(s, stream).randn(shape, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&parts, 0)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_noise_other_key_other_noise() {
        let a = rng_for(7, Stream::Cfm(0)).randn(&[2, 3], &Device::Cpu).unwrap();
        let b = rng_for(7, Stream::Cfm(0)).randn(&[2, 3], &Device::Cpu).unwrap();
        let c = rng_for(7, Stream::Cfm(1)).randn(&[2, 3], &Device::Cpu).unwrap();
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(a, c.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn batch_equals_singles() {
        let batch = randn_batch(&[1, 2], Stream::Base, &[4], &Device::Cpu).unwrap();
        let one = rng_for(2, Stream::Base).randn(&[4], &Device::Cpu).unwrap();
        assert_eq!(
            batch.get(1).unwrap().to_vec1::<f32>().unwrap(),
            one.to_vec1::<f32>().unwrap()
        );
    }
}

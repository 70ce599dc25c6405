//! The one source of randomness of a run: a ChaCha8 stream seeded by the recipe's seed, so LoRA
//! init, dropout masks and shuffling are bit-reproducible and can be checkpointed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KilnRng(ChaCha8Rng);

impl KilnRng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A child stream for one purpose (init, dropout, data order), independent of how much the
    /// others have drawn.
    pub fn fork(seed: u64, stream: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stream);
        Self(r)
    }

    pub fn uniform(&mut self, n: usize, low: f32, high: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.random_range(low..high)).collect()
    }

    /// `n` draws from N(mean, std²). Beyond a million values the draws come from child streams
    /// of one seed, a million each, made on all cores.
    pub fn normal(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        const CHUNK: usize = 1 << 20;
        let dist = rand_distr::Normal::new(mean, std).expect("std must be finite and >= 0");
        if n <= CHUNK {
            return (0..n).map(|_| self.0.sample(dist)).collect();
        }
        use rayon::prelude::*;
        let seed = self.next_seed();
        let mut out = vec![0f32; n];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, part)| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(k as u64);
            part.iter_mut().for_each(|v| *v = r.sample(dist));
        });
        out
    }

    /// Dropout keep-mask scaled by `1/(1-p)`.
    pub fn dropout_mask(&mut self, n: usize, p: f32) -> Vec<f32> {
        let scale = 1.0 / (1.0 - p);
        (0..n)
            .map(|_| {
                if self.0.random::<f32>() < p {
                    0.0
                } else {
                    scale
                }
            })
            .collect()
    }

    /// A fresh 64-bit seed (for hashed dropout streams and per-layer streams).
    pub fn next_seed(&mut self) -> u64 {
        self.0.random::<u64>()
    }

    /// A uniform draw from [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        use rand::seq::SliceRandom;
        v.shuffle(&mut self.0);
    }
}

//! Inference with the training code's model: loading a base (+ adapter) for evaluation,
//! KV-cache generation, and evaluation (loss, perplexity, exact match).

pub mod chat;
pub mod eval;
pub mod evaluate;
pub mod generate;
pub mod imatrix;
pub mod speculative;

use std::path::Path;

use candle_core::DType;

use crate::error::Result;
use crate::model::peft::{apply_adapter, merge_adapter_in_place, read_adapter};
use crate::model::{self, LoadOptions, LoadedModel};

/// How to load a model for inference.
#[derive(Debug, Clone)]
pub struct InferenceOptions {
    /// `auto`, `cpu`, `cuda[:N]`, `metal`.
    pub device: String,
    /// `None`: f32 on CPU, bf16 on GPU.
    pub dtype: Option<DType>,
    /// `None`: NF4 when an adapter is given (the base it was trained on), dense otherwise.
    pub quantize: Option<bool>,
    /// Keep only the first N decoder layers (see `LoadOptions::layers`).
    pub layers: Option<usize>,
    /// Random weights of config.json's shapes instead of the checkpoint (speed benchmarks on real
    /// architectures without one).
    pub random_weights: bool,
    /// With a dense base, add the adapter into the base weights at load instead of running it
    /// beside them (a speculative draft: faster, and its rounding only moves acceptance).
    pub merge_adapter: bool,
}

impl Default for InferenceOptions {
    fn default() -> Self {
        Self {
            device: "auto".into(),
            dtype: None,
            quantize: None,
            layers: None,
            random_weights: false,
            merge_adapter: false,
        }
    }
}

/// Loads the model in `model_dir` (`tiny:llama` works too) with the PEFT adapter in `adapter`.
pub fn load(
    model_dir: &str,
    adapter: Option<&Path>,
    opts: &InferenceOptions,
) -> Result<LoadedModel> {
    let device = crate::device::open(&opts.device)?;
    let dtype = opts
        .dtype
        .unwrap_or_else(|| crate::device::auto_dtype(&device));
    let dir = model::source::resolve_model_path(model_dir)?;
    let adapter = adapter.map(read_adapter).transpose()?;
    let quantize = opts.quantize.unwrap_or(adapter.is_some());
    let merge = opts.merge_adapter && !quantize;
    // On the CPU an NF4 base in f32 is dequantized once, not at every call, where its dense copy
    // takes at most a quarter of the machine's memory: about three times the decoding speed.
    // Only in f32, where the held values are exactly those every call (and a merge) dequantizes
    // to; in a narrower dtype they would be rounded once more before an adapter is merged.
    let nf4_dequantized = quantize && device.is_cpu() && dtype == DType::F32 && {
        let dense = model::load_config(&dir)?.num_params() as u64 * dtype.size_in_bytes() as u64;
        crate::device::host_memory_bytes().is_some_and(|m| dense <= m / 4)
    };
    let load_opts = LoadOptions {
        layers: opts.layers,
        nf4_dequantized,
        device,
        dtype,
        quantize,
        lora: adapter
            .as_ref()
            .filter(|_| !merge)
            .map(|a| a.settings.clone()),
        seed: 0,
    };
    let loaded = if opts.random_weights {
        model::load_random(&dir, &load_opts)?
    } else {
        model::load(&dir, &load_opts)?
    };
    match &adapter {
        Some(a) if merge => merge_adapter_in_place(&loaded.model, a)?,
        Some(a) => apply_adapter(&loaded.model, a)?,
        None => {}
    }
    Ok(loaded)
}

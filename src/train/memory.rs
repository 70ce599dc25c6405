//! How many decoder layers recompute their activations in the backward pass
//! (`training.gradient_checkpointing`): all, none, or with `auto` as few as the device's free
//! memory allows, so memory a device has to spare buys speed (no recomputed forward).

use crate::error::Result;
use crate::model::decoder::Decoder;
use crate::recipe::Checkpointing;

/// Bytes of activations a decoder layer keeps for its backward pass when it is not recomputed,
/// per token (bf16), measured with 8,192 tokens a micro-batch, all layers kept against all
/// recomputed, on an H200:
/// - the explicit step (`crate::step`) keeps x, q, k, v, the attention output, h, gate and up:
///   2 bytes × (2 × intermediate + 4 × hidden + 2 × kv width) ([`super::plan`]'s model, which
///   predicts the measured peaks of every-layer-kept and every-layer-recomputed runs);
/// - the reference path's graph keeps more: 2 bytes × (2 × intermediate + 18 × hidden).
///   Measured 2026-11-29: 0.69 and 1.35 GiB a layer.
///
/// Mixtures count the experts a token visits.
pub fn kept_layer_bytes_per_token(model: &Decoder, explicit_step: bool) -> usize {
    let c = &model.config;
    if explicit_step {
        return super::plan::kept_bytes_per_token(c) as usize;
    }
    2 * (2 * super::plan::active_intermediate(c) + 18 * c.hidden_size)
}

/// The share of the free device memory (after loading) that kept activations may take; the rest
/// is for the checkpointed layers' own peak, the loss, the optimizer and the allocator.
const AUTO_SHARE: f64 = 0.7;

/// The layer count `policy` recomputes for micro-batches of at most `tokens` tokens, and a line
/// saying why when `auto` chose.
pub fn recomputed_layers(
    recipe: &crate::recipe::Recipe,
    model: &Decoder,
    explicit_step: bool,
) -> Result<(usize, Option<String>)> {
    let policy = recipe.training.gradient_checkpointing;
    let tokens = recipe.training.micro_batch_size * recipe.data.max_seq_len;
    let layers = model.layers.len();
    Ok(match policy {
        Checkpointing::On | Checkpointing::Offload => (layers, None),
        Checkpointing::Off => (0, None),
        Checkpointing::Auto => match free_device_memory(model)? {
            None => (layers, None),
            // The explicit step's memory is `kiln plan`'s model: decide as the plan does, on the
            // memory that was free before loading.
            Some(free) if explicit_step => {
                let c = &model.config;
                // What the device's free memory after loading no longer includes.
                let resident = super::plan::plan_for(c, recipe, 0).resident_bytes;
                // The teacher of `[distill]` loads after this decision: leave it its room.
                let teacher = super::plan::distill_part(recipe)?.map_or(0, |p| p.bytes);
                let before = (free as u64 + resident).saturating_sub(teacher);
                let recomputed = super::plan::recomputed_for(c, recipe, Some(before));
                let plan = super::plan::plan_for(c, recipe, recomputed);
                let line = format!(
                    "gradient checkpointing (auto): {recomputed} of {layers} layers recomputed; predicted peak {:.1} GiB of {:.1} GiB (`kiln plan` shows the parts)",
                    super::plan::gib(plan.peak_bytes),
                    super::plan::gib(before),
                );
                (recomputed, Some(line))
            }
            Some(free) => {
                let per_layer = kept_layer_bytes_per_token(model, explicit_step) * tokens;
                let kept = layers_that_fit(free, per_layer, layers);
                let gib = |b: f64| b / (1u64 << 30) as f64;
                let line = format!(
                    "gradient checkpointing (auto): {} of {layers} layers recomputed; {:.1} GiB free, about {:.2} GiB a kept layer at {tokens} tokens a micro-batch",
                    layers - kept,
                    gib(free as f64),
                    gib(per_layer as f64),
                );
                (layers - kept, Some(line))
            }
        },
    })
}

/// How many of `layers` layers of `per_layer` bytes fit in [`AUTO_SHARE`] of `free` bytes.
pub fn layers_that_fit(free: usize, per_layer: usize, layers: usize) -> usize {
    let budget = free as f64 * AUTO_SHARE;
    ((budget / per_layer.max(1) as f64) as usize).min(layers)
}

/// Free memory of the model's CUDA device; `None` elsewhere (the CPU and Metal keep every layer
/// recomputed under `auto`).
fn free_device_memory(model: &Decoder) -> Result<Option<usize>> {
    Ok(super::plan::free_memory(&model.device)?.map(|f| f as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_the_layers_that_fit_in_its_share_of_free_memory() {
        let gib = 1usize << 30;
        // 139 GiB free, 1 GiB a layer: all 16 kept; 10 GiB free: 7 of them.
        assert_eq!(layers_that_fit(139 * gib, gib, 16), 16);
        assert_eq!(layers_that_fit(10 * gib, gib, 16), 7);
        assert_eq!(layers_that_fit(0, gib, 16), 0);
    }
}

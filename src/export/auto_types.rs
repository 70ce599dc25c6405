//! `kiln export gguf --quant auto`: per-tensor types chosen under a file-size budget by what
//! each tensor's rounding measurably costs, rather than by a fixed recipe.
//!
//! 1. Each weight's sensitivity: the model is run on a few calibration rows with that one
//!    weight rounded to its cheapest candidate type (under the importance matrix), and the
//!    mean KL of its next-token distributions from the unrounded model's is measured.
//! 2. The other candidate types are priced by the importance-weighted squared rounding error
//!    each leaves: KL(type) ≈ KL(cheapest) · error(type) / error(cheapest).
//! 3. Starting from the cheapest type everywhere, the upgrade with the most KL saved per byte
//!    is taken while the budget allows; the per-tensor KLs are taken to add up.
//!
//! Candidates: rows of 256 take Q4_K, Q6_K or Q8_0; other rows of 32 take Q4_0, Q5_0 or Q8_0.

use std::collections::HashMap;

use candle_core::{DType, Tensor, D};

use crate::data::Example;
use crate::error::Result;
use crate::gguf::{calibrated, quants, GgmlType};
use crate::model::decoder::{Decoder, FeedForward, FrozenWeight, GateUpProj, Linear, QkvProj};
use crate::model::LoadedModel;

/// One quantizable weight: its GGUF and model names, element count, row length and candidate
/// types from cheapest, with the KL each is predicted to add.
#[derive(Debug, Clone)]
pub struct Choice {
    pub gguf: String,
    pub hf: String,
    pub elements: u64,
    pub types: Vec<GgmlType>,
    pub kl: Vec<f64>,
}

impl Choice {
    fn bytes(&self, i: usize) -> u64 {
        self.types[i].bytes_for(self.elements as usize) as u64
    }
}

/// The candidate types of a weight with rows of `n`.
fn candidates(n: u64) -> Vec<GgmlType> {
    if n.is_multiple_of(256) {
        vec![GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0]
    } else if n.is_multiple_of(32) {
        vec![GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0]
    } else {
        vec![]
    }
}

/// `w` (rows of `importance.len()` or `n`) rounded to `ty` and back, under the importance.
fn rounded(ty: GgmlType, w: &[f32], n: usize, importance: Option<&[f32]>) -> Result<Vec<f32>> {
    let bytes = match importance.filter(|i| i.len() == n && calibrated::uses_importance(ty)) {
        Some(imp) => calibrated::quantize_with_importance(ty, w, imp)?,
        None => quants::quantize(ty, w)?,
    };
    quants::dequantize(ty, &bytes)
}

/// Σ importance · (w − ŵ)² over every element.
fn weighted_error(w: &[f32], r: &[f32], n: usize, importance: Option<&[f32]>) -> f64 {
    w.iter()
        .zip(r)
        .enumerate()
        .map(|(i, (a, b))| {
            let d = (a - b) as f64;
            importance.map_or(1.0, |imp| imp[i % n] as f64) * d * d
        })
        .sum()
}

/// Where a model tensor lives, to swap it for a rounded copy and back.
enum Slot<'a> {
    Linear(&'a mut Linear),
    Tensor(&'a mut Tensor),
}

/// The projection or tensor named `hf` (Hugging Face names) in `model`.
fn slot<'a>(model: &'a mut Decoder, hf: &str) -> Option<Slot<'a>> {
    match hf {
        "model.embed_tokens.weight" => return Some(Slot::Tensor(&mut model.embed_tokens)),
        "lm_head.weight" => return model.lm_head.as_mut().map(Slot::Tensor),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, module) = rest.split_once('.')?;
    let layer = std::sync::Arc::get_mut(model.layers.get_mut(i.parse::<usize>().ok()?)?)?;
    let attn = &mut layer.self_attn;
    let linear = match (module, &mut attn.qkv) {
        ("self_attn.q_proj.weight", QkvProj::Split { q_proj, .. }) => q_proj,
        ("self_attn.k_proj.weight", QkvProj::Split { k_proj, .. }) => k_proj,
        ("self_attn.v_proj.weight", QkvProj::Split { v_proj, .. }) => v_proj,
        ("self_attn.qkv_proj.weight", QkvProj::Fused { qkv_proj }) => qkv_proj,
        ("self_attn.o_proj.weight", _) => &mut attn.o_proj,
        _ => {
            let FeedForward::Dense(mlp) = &mut layer.mlp else {
                return None;
            };
            match (module, &mut mlp.gate_up) {
                ("mlp.gate_proj.weight", GateUpProj::Split { gate_proj, .. }) => gate_proj,
                ("mlp.up_proj.weight", GateUpProj::Split { up_proj, .. }) => up_proj,
                ("mlp.gate_up_proj.weight", GateUpProj::Fused { gate_up_proj }) => gate_up_proj,
                ("mlp.down_proj.weight", _) => &mut mlp.down_proj,
                _ => return None,
            }
        }
    };
    Some(Slot::Linear(linear))
}

/// The log-probabilities of every position of every row (f32, `[T, V]` each).
fn log_probs(model: &Decoder, rows: &[Vec<u32>]) -> Result<Vec<Tensor>> {
    rows.iter()
        .map(|ids| {
            let x = Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?;
            let logits = model.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
            Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
        })
        .collect()
}

/// Mean KL(reference ‖ model) over all positions.
fn mean_kl(model: &Decoder, rows: &[Vec<u32>], reference: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    let mut positions = 0usize;
    for (lp, r) in log_probs(model, rows)?.iter().zip(reference) {
        let kl = (r.exp()? * (r - lp)?)?.sum_all()?.to_scalar::<f32>()?;
        total += kl as f64;
        positions += r.dim(0)?;
    }
    Ok(total / positions.max(1) as f64)
}

/// Measures every candidate weight's sensitivity and prices its types (module docs).
/// `planned` is the export's tensor list (GGUF name, dims, model name).
pub fn price(
    loaded: &mut LoadedModel,
    planned: &[(String, Vec<u64>, Option<String>)],
    importance: &HashMap<String, Vec<f32>>,
    examples: &[Example],
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Choice>> {
    // A few rows, cut to 128 tokens: the sensitivities only need to rank the weights.
    let rows: Vec<Vec<u32>> = examples
        .iter()
        .take(4)
        .map(|e| e.input_ids.iter().take(128).copied().collect())
        .collect();
    let reference = log_probs(&loaded.model, &rows)?;
    let weights: Vec<_> = planned
        .iter()
        .filter(|(g, dims, hf)| hf.is_some() && crate::export::gguf_types::quantizable(g, dims))
        .filter(|(_, dims, _)| !candidates(dims[0]).is_empty())
        .collect();
    let mut out = vec![];
    for (done, (gguf, dims, hf)) in weights.iter().enumerate() {
        let hf = hf.as_ref().expect("filtered");
        let parts = crate::export::merge::merged_parts(&loaded.model);
        let Some((_, part)) = parts.iter().find(|(n, _)| n == hf) else {
            continue;
        };
        let original = part.to_f32()?;
        drop(parts);
        let n = dims[0] as usize;
        let w = original.flatten_all()?.to_vec1::<f32>()?;
        let imp = importance.get(gguf).map(Vec::as_slice);
        let types = candidates(dims[0]);
        let mut errors = vec![];
        let mut cheapest = None;
        for (i, &ty) in types.iter().enumerate() {
            let r = rounded(ty, &w, n, imp)?;
            errors.push(weighted_error(&w, &r, n, imp));
            if i == 0 {
                cheapest = Some(r);
            }
        }
        let r = Tensor::from_vec(
            cheapest.expect("one type"),
            original.shape(),
            &loaded.model.device,
        )?
        .to_dtype(loaded.model.dtype)?;
        let kl0 = with_weight(&mut loaded.model, hf, r, |m| mean_kl(m, &rows, &reference))?;
        let kl = errors
            .iter()
            .map(|e| {
                if errors[0] > 0.0 {
                    kl0 * e / errors[0]
                } else {
                    0.0
                }
            })
            .collect();
        out.push(Choice {
            gguf: gguf.clone(),
            hf: hf.clone(),
            elements: dims.iter().product(),
            types,
            kl,
        });
        progress(done + 1, weights.len());
    }
    Ok(out)
}

/// Runs `f` with the model tensor `hf` replaced by `value` (a projection's adapter set aside:
/// `value` is the merged weight), then puts the original back.
fn with_weight<R>(
    model: &mut Decoder,
    hf: &str,
    value: Tensor,
    f: impl FnOnce(&Decoder) -> Result<R>,
) -> Result<R> {
    let missing = || crate::error::KilnError::Quant(format!("no model tensor `{hf}` to measure"));
    let saved = match slot(model, hf).ok_or_else(missing)? {
        Slot::Linear(l) => {
            let base = std::mem::replace(&mut l.base, FrozenWeight::Dense(value));
            (Some((base, l.lora.take())), None)
        }
        Slot::Tensor(t) => (None, Some(std::mem::replace(t, value))),
    };
    let out = f(model);
    match (slot(model, hf).ok_or_else(missing)?, saved) {
        (Slot::Linear(l), (Some((base, lora)), _)) => {
            l.base = base;
            l.lora = lora;
        }
        (Slot::Tensor(t), (_, Some(original))) => *t = original,
        _ => unreachable!("the slot kind does not change"),
    }
    out
}

/// The types within `budget` bytes (the weights' share of the file): from the cheapest, the
/// upgrade saving the most predicted KL per byte first. Returns the type of each weight, and the
/// predicted KL and bytes.
pub fn allocate(choices: &[Choice], budget: u64) -> (HashMap<String, GgmlType>, f64, u64) {
    let mut at = vec![0usize; choices.len()];
    let mut bytes: u64 = choices.iter().map(|c| c.bytes(0)).sum();
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, c) in choices.iter().enumerate() {
            for j in at[i] + 1..c.types.len() {
                let extra = c.bytes(j) - c.bytes(at[i]);
                if bytes + extra > budget {
                    continue;
                }
                let gain = (c.kl[at[i]] - c.kl[j]) / extra.max(1) as f64;
                if gain > 0.0 && best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else { break };
        bytes += choices[i].bytes(j) - choices[i].bytes(at[i]);
        at[i] = j;
    }
    let kl = choices.iter().zip(&at).map(|(c, &j)| c.kl[j]).sum();
    let types = choices
        .iter()
        .zip(&at)
        .map(|(c, &j)| (c.gguf.clone(), c.types[j]))
        .collect();
    (types, kl, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(name: &str, elements: u64, kl: [f64; 3]) -> Choice {
        Choice {
            gguf: name.into(),
            hf: name.into(),
            elements,
            types: vec![GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0],
            kl: kl.to_vec(),
        }
    }

    /// The budget goes to the weight whose upgrade saves the most KL per byte, and never past
    /// the budget.
    #[test]
    fn allocation_spends_bytes_where_kl_falls_most() {
        let n = 256 * 64;
        let choices = [
            choice("sensitive", n, [1.0, 0.2, 0.05]),
            choice("robust", n, [0.01, 0.004, 0.001]),
        ];
        let q4 = GgmlType::Q4_K.bytes_for(n as usize) as u64;
        let q6 = GgmlType::Q6_K.bytes_for(n as usize) as u64;
        let (types, kl, bytes) = allocate(&choices, q4 + q6);
        assert_eq!(types["sensitive"], GgmlType::Q6_K);
        assert_eq!(types["robust"], GgmlType::Q4_K);
        assert!((kl - 0.21).abs() < 1e-12 && bytes == q4 + q6);
        let (types, _, bytes) = allocate(&choices, 2 * q4);
        assert!(types.values().all(|&t| t == GgmlType::Q4_K) && bytes == 2 * q4);
    }
}

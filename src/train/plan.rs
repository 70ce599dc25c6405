//! `kiln plan`: the peak GPU memory and step time of a recipe, predicted from config.json and the
//! recipe before any weight loads, and what fits a device. `kiln train` runs the same check and
//! refuses a recipe that cannot fit, before loading.
//!
//! The memory model (bf16 compute, the explicit CUDA step), per part:
//! - frozen linear weights: NF4 0.5 byte a weight + the double-quantized scales (a u8 code per
//!   64 weights, an f32 per 256 codes); bf16 without quantization;
//! - embeddings, output head and norms in bf16 (offloaded with an untied head, the input
//!   embeddings live in host memory);
//! - LoRA: f32 weights, gradients and AdamW's two moments (16 bytes a parameter);
//! - activations: a kept layer saves x, q, k, v, the attention output, h, gate and up,
//!   2 × (2·I + 4·H + 2·kv) bytes a token; a recomputed layer its input (2·H), plus one layer's
//!   full set while it is recomputed;
//! - the loss chunk: 2^26 logits, in bf16 and their gradient;
//! - workspace: a layer's backward gradients (14·H + 4·kv bytes a token), the MLP backward's two
//!   [T, I] bf16 buffers beyond gate and up (T capped at the MLP's tile of rows, past which gate and up are not
//!   kept either), the largest dequantized weight, slack growing with the model (a third of the
//!   frozen weights' bytes), and the CUDA context, cuBLAS and the allocator's fixed slack
//!   ([`RUNTIME_BYTES`]).
//!
//! Fitted on, and tested against, the peaks measured on an H200 (BENCHMARKS.md, 2026-11-30):
//! Llama-3.2-1B 8.69 GiB (every layer kept) and 3.41 GiB (every layer recomputed),
//! Llama-3.1-8B 32.01 and 11.10 GiB, at 8,192 tokens a micro-batch.

use crate::model::ModelConfig;
use crate::recipe::{Checkpointing, Quantize, Recipe};

/// The CUDA context, cuBLAS workspace and the stream-ordered allocator's fixed slack: fitted,
/// with [`SLACK_PER_FROZEN_BYTE`] and the MLP backward's two buffers, to the 24 measured peaks
/// (the shared job's four; both models at 2k, 16k and 64k tokens under each policy; 128k
/// offloaded), which the model then predicts within 7% (BENCHMARKS.md).
pub const RUNTIME_BYTES: u64 = 600 << 20;

/// Memory that grows with the model beyond its stored weights (a layer's weights dequantized at
/// once, the allocator's pools): a third of the frozen weights' bytes, fitted as
/// [`RUNTIME_BYTES`] is (the 1B's peaks alone sit 0.6 GiB under a constant that fits the 8B's).
const SLACK_PER_FROZEN_BYTE: f64 = 1.0 / 3.0;

/// Logits a loss chunk computes at once (`ops::loss`).
const LOSS_CHUNK_LOGITS: u64 = 1 << 26;

/// Dense bf16 matrix throughput a training step reaches on an H200 (BENCHMARKS.md step 12, the
/// shared job with attention on cuDNN: the 1B step at about 460 TFLOP/s of useful work, the 8B at
/// about 540; the bf16 GEMM rate is 762).
const STEP_FLOPS_PER_S: f64 = 500e12;

/// A frozen teacher's forward pass and its share of the distillation loss (`[distill]`), fitted
/// on an H200 (BENCHMARKS.md, eighth session): Llama-3.1-8B in NF4 beside a Llama-3.2-1B student
/// added 0.91 s to the student's 0.52 s step of 32,768 tokens, with the teacher on the training
/// step's layer code and the loss in one fused kernel a chunk: about 560 TFLOP/s.
const TEACHER_FLOPS_PER_S: f64 = 560e12;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Part {
    pub name: &'static str,
    pub bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub tokens_per_micro_batch: usize,
    pub layers: usize,
    pub recomputed_layers: usize,
    pub parts: Vec<Part>,
    pub peak_bytes: u64,
    /// Held once the model is loaded, before the first step: weights, LoRA and its optimizer.
    pub resident_bytes: u64,
    pub activation_bytes: u64,
    /// Seconds a step takes at [`STEP_FLOPS_PER_S`] (all its micro-batches).
    pub step_seconds: f64,
    /// Host memory `"offload"` takes: the layer inputs (pinned) and an untied model's input embeddings.
    pub host_bytes: u64,
}

/// Bytes of one layer's kept activations a token (the explicit step's saved set).
pub fn kept_bytes_per_token(c: &ModelConfig) -> u64 {
    let intermediate = active_intermediate(c) as u64;
    let kv = c.num_kv_heads * c.head_dim;
    2 * (2 * intermediate + (4 * c.hidden_size + 2 * kv) as u64)
}

/// The MLP width a token passes through: the intermediate size, or an expert's times the
/// experts a token visits in a mixture.
pub fn active_intermediate(c: &ModelConfig) -> usize {
    if c.num_experts > 0 {
        c.expert_intermediate_size * c.experts_per_token
    } else {
        c.intermediate_size
    }
}

/// Frozen linear weights of all layers (experts included).
fn linear_weights(c: &ModelConfig) -> u64 {
    (c.num_layers * (dense_layer_weights(c) + c.num_experts * expert_weights(c))) as u64
}

/// The weights one token multiplies by in a layer: the dense projections, and in a mixture the
/// router and the experts it is routed to (a step's FLOPs follow these, not the stored experts).
fn active_layer_weights(c: &ModelConfig) -> usize {
    let routed = match c.num_experts {
        0 => 0,
        n => n * c.hidden_size + c.experts_per_token * expert_weights(c),
    };
    dense_layer_weights(c) + routed
}

/// A layer's projections outside a mixture of experts.
fn dense_layer_weights(c: &ModelConfig) -> usize {
    c.layer_linears().iter().map(|(_, _, o, i)| o * i).sum()
}

/// One expert's gate, up and down projections.
fn expert_weights(c: &ModelConfig) -> usize {
    3 * c.hidden_size * c.expert_intermediate_size
}

/// Positions a row of `max_seq_len` token ids runs through the model: every id but the last is
/// an input (the last is only a target).
fn positions(recipe: &Recipe) -> usize {
    recipe.data.max_seq_len.saturating_sub(1).max(1)
}

/// Sequences a micro-batch holds: `micro_batch_size`, or with a preference method two a pair.
fn sequences(recipe: &Recipe) -> usize {
    let pairs = recipe.training.method.is_preference();
    recipe.training.micro_batch_size * if pairs { 2 } else { 1 }
}

/// The plan for `recipe` on `config` with `recomputed` of the layers recomputed.
pub fn plan_for(c: &ModelConfig, recipe: &Recipe, recomputed: usize) -> Plan {
    let tokens = positions(recipe) * sequences(recipe);
    let tok = tokens as u64;
    let weights = linear_weights(c);
    let frozen = match recipe.model.quantize {
        Quantize::Nf4 => weights / 2 + weights / 64 + weights / (64 * 256) * 4,
        _ => weights * 2,
    };
    let offload = recipe.training.gradient_checkpointing == Checkpointing::Offload;
    // Offloaded with an untied head, the input embeddings stay in host memory
    // (`Llama::embeddings_to_host`).
    let embed = 2 * (c.vocab_size * c.hidden_size) as u64;
    let embed_on_host = offload && !c.tie_word_embeddings;
    let dense = embed
        * if c.tie_word_embeddings || embed_on_host {
            1
        } else {
            2
        }
        + 2 * (c.num_layers * 4 * c.hidden_size) as u64;
    let lora_params =
        crate::model::lora_param_count(c, &crate::lora::LoraSettings::of(recipe)) as u64;
    // Past 2^27 elements a `[tokens, intermediate]` tensor, the MLP runs in tiles of rows and
    // keeps no gate/up (`step::layer::mlp_rows`).
    let intermediate = active_intermediate(c) as u64;
    let mlp_rows = (crate::step::mlp_rows(c.intermediate_size, None) as u64).min(tok);
    let tiled = mlp_rows < tok;
    let per_token = kept_bytes_per_token(c) - if tiled { 4 * intermediate } else { 0 };
    let kept = (c.num_layers - recomputed) as u64 * per_token * tok;
    // Offloaded, two inputs are on the device at once (one coming back while the other's layer
    // runs); the rest wait in pinned host memory.
    let on_device = if offload {
        recomputed.min(2)
    } else {
        recomputed
    };
    let inputs = on_device as u64 * 2 * c.hidden_size as u64 * tok;
    let replay = if recomputed > 0 { per_token * tok } else { 0 };
    // A layer's backward holds gradients of its activations at once: dh (and its tiles), the
    // attention output's, q's (with cuDNN's f32 accumulator), k's and v's, the input's: about
    // 14 hidden-widths and 4 key/value-widths of bytes a token (fitted at 16k-128k tokens,
    // BENCHMARKS.md "Long sequences").
    let backward_grads = (14 * c.hidden_size + 4 * c.num_kv_heads * c.head_dim) as u64 * tok;
    let workspace = backward_grads
        + 2 * 2 * intermediate * mlp_rows
        + 2 * (c.intermediate_size * c.hidden_size) as u64
        + (frozen as f64 * SLACK_PER_FROZEN_BYTE) as u64
        + RUNTIME_BYTES;
    let parts = vec![
        Part {
            name: "frozen linear weights (NF4 + scales, or bf16)",
            bytes: frozen,
        },
        Part {
            name: "embeddings, output head and norms (bf16)",
            bytes: dense,
        },
        Part {
            name: "LoRA weights, gradients and AdamW state (f32)",
            bytes: 16 * lora_params,
        },
        Part {
            name: "activations",
            bytes: kept + inputs + replay,
        },
        Part {
            name: "loss chunk",
            bytes: LOSS_CHUNK_LOGITS * 4,
        },
        Part {
            name:
                "workspace (a layer's backward, the MLP's tile, a dequantized weight, CUDA runtime)",
            bytes: workspace,
        },
    ];
    let peak_bytes = parts.iter().map(|p| p.bytes).sum();
    Plan {
        host_bytes: if offload {
            recomputed as u64 * 2 * c.hidden_size as u64 * tok
                + if embed_on_host { embed } else { 0 }
        } else {
            0
        },
        resident_bytes: frozen + dense + 16 * lora_params,
        activation_bytes: kept + inputs + replay,
        tokens_per_micro_batch: tokens,
        layers: c.num_layers,
        recomputed_layers: recomputed,
        parts,
        peak_bytes,
        step_seconds: step_flops(c, recipe, recomputed) / STEP_FLOPS_PER_S,
    }
}

/// FLOPs of one optimizer step: frozen projections forward and input-gradient (4 a weight a
/// token; in a mixture, the experts a token is routed to), the recomputed layers' forward again, the output head's logits and gradient, and
/// causal attention (3.5× its forward).
fn step_flops(c: &ModelConfig, recipe: &Recipe, recomputed: usize) -> f64 {
    let t = &recipe.training;
    let seq = positions(recipe) as f64;
    let tokens = seq * (sequences(recipe) * t.gradient_accumulation_steps) as f64;
    let per_layer = active_layer_weights(c) as f64;
    let attention = 2.0 * seq * (c.num_heads * c.head_dim) as f64 * 3.5;
    let layer = 4.0 * per_layer + attention;
    let replay = recomputed as f64 * (2.0 * per_layer + attention / 3.5);
    let head = 4.0 * (c.vocab_size * c.hidden_size) as f64;
    // DPO's reference: one more forward pass, adapters off (and the policy's log-probabilities
    // a second head pass).
    let reference = match t.method {
        crate::recipe::Method::Dpo => {
            c.num_layers as f64 * (2.0 * per_layer + attention / 3.5) + head / 2.0
        }
        _ => 0.0,
    };
    tokens * (c.num_layers as f64 * layer + replay + head + reference)
}

/// The share of the free memory `auto` plans to fill: the model errs by up to 10%.
pub const AUTO_FIT: f64 = 0.9;

/// The layers `policy` recomputes given `free` device bytes before loading (`auto`: as few as
/// keep the predicted peak within [`AUTO_FIT`] of it).
pub fn recomputed_for(c: &ModelConfig, recipe: &Recipe, free: Option<u64>) -> usize {
    match recipe.training.gradient_checkpointing {
        Checkpointing::On | Checkpointing::Offload => c.num_layers,
        Checkpointing::Off => 0,
        Checkpointing::Auto => match free {
            None => c.num_layers,
            Some(free) => (0..=c.num_layers)
                .find(|&r| plan_for(c, recipe, r).peak_bytes as f64 <= free as f64 * AUTO_FIT)
                .unwrap_or(c.num_layers),
        },
    }
}

/// The largest micro-batch (at the recipe's sequence length) and the longest sequence (at
/// micro-batch 1) that fit `free` bytes with every layer recomputed, their predicted peak within
/// [`AUTO_FIT`] of it: a suggestion keeps the plan's ±10% as a margin (the 8B offloaded at
/// 294,912 tokens measured 40.27 GiB where the plan said 38.6).
pub fn largest_fitting(c: &ModelConfig, recipe: &Recipe, free: u64) -> (usize, usize) {
    let fits = |seq: usize, micro: usize| {
        let mut r = recipe.clone();
        r.data.max_seq_len = seq;
        r.training.micro_batch_size = micro;
        plan_for(c, &r, c.num_layers).peak_bytes as f64 <= free as f64 * AUTO_FIT
    };
    let micro = (1..=4096)
        .take_while(|&m| fits(recipe.data.max_seq_len, m))
        .last()
        .unwrap_or(0);
    let mut seq = 0;
    let mut step = 1 << 20;
    while step >= 256 {
        if fits(seq + step, 1) {
            seq += step;
        } else {
            step /= 2;
        }
    }
    (micro, seq)
}

/// What `kiln plan` reports: the plan under the recipe's policy (`auto`: what it would choose,
/// every layer recomputed without a device), the device's free memory, what fits it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub plan: Plan,
    pub free_bytes: Option<u64>,
    pub fits: Option<bool>,
    pub largest_micro_batch: Option<usize>,
    pub longest_sequence: Option<usize>,
    #[serde(skip)]
    pub text: String,
}

/// The model's config without loading a weight (a directory's config.json, a GGUF's metadata,
/// or a config.json given as model.path: planning needs no weights).
fn config_of(recipe: &Recipe) -> crate::error::Result<ModelConfig> {
    let mut c = config_at(&recipe.model.path)?;
    if let Some(n) = recipe.model.layers {
        c.num_layers = c.num_layers.min(n);
    }
    Ok(c)
}

/// Device memory `[distill]` adds on the student's device: the teacher held there (its frozen
/// weights, embeddings and head, one forward pass's activations and its final hidden states), or,
/// with the teacher on another device, its output head's copy and hidden states (with a cache,
/// the cached rows); and distillation's loss chunks, larger than the cross-entropy's. Built from
/// the same terms as the student's parts; an 8B teacher beside a 1B student measured 9.73 GiB
/// where the plan says 10.03.
pub fn distill_part(recipe: &Recipe) -> crate::error::Result<Option<Part>> {
    let Some(d) = &recipe.distill else {
        return Ok(None);
    };
    let tokens = (positions(recipe) * recipe.training.micro_batch_size) as u64;
    // The candle-ops path: 2^24 f32 values a chunk, about eight tensors of them alive, against
    // the 2^26-logit chunk the plan counts for the cross-entropy. (CUDA's fused kernel holds
    // less: 2^26 student logits and the teacher's, in bf16; the peak measured within the plan's
    // 10% all the same.)
    let chunks = (8u64 << 24) * 4 - LOSS_CHUNK_LOGITS * 4;
    if d.cache.is_some() {
        let k = d.top_k as u64;
        return Ok(Some(Part {
            name: "distillation: the cached teacher rows and the loss chunks",
            bytes: tokens * k * 8 + chunks,
        }));
    }
    let Some(path) = &d.teacher else {
        return Ok(None);
    };
    let t = config_at(path)?;
    let (h, vocab) = (t.hidden_size as u64, t.vocab_size as u64);
    let hidden = 2 * h * tokens;
    // `auto` and `cuda` mean the first GPU, as `cuda:0` does.
    let first_gpu = |spec: &str| {
        use crate::device::DeviceSpec::{Auto, Cuda};
        match crate::device::parse_device_spec(spec) {
            Ok(Auto) | Ok(Cuda(0)) => "cuda:0".to_string(),
            _ => spec.trim().to_ascii_lowercase(),
        }
    };
    let same_device = d
        .teacher_device
        .as_ref()
        .is_none_or(|td| first_gpu(td) == first_gpu(&recipe.model.device));
    if !same_device {
        return Ok(Some(Part {
            name: "distillation: the teacher's output head and hidden states (the teacher on its own device)",
            bytes: 2 * vocab * h + hidden + chunks,
        }));
    }
    let weights = linear_weights(&t);
    let frozen = match d.teacher_quantize {
        Quantize::Nf4 => weights / 2 + weights / 64 + weights / (64 * 256) * 4,
        _ => weights * 2,
    };
    let dense = 2 * vocab * h * if t.tie_word_embeddings { 1 } else { 2 };
    let kv = (t.num_kv_heads * t.head_dim) as u64;
    // One layer at a time, nothing kept for a backward: its input and output, q, k, v and the
    // attention output, gate, up and their product.
    let layer = tokens * (2 * (4 * h + 2 * kv) + 2 * 3 * active_intermediate(&t) as u64);
    Ok(Some(Part {
        name: "distillation: the teacher (weights, one forward pass, its hidden states) and the loss chunks",
        bytes: frozen + dense + layer + 2 * hidden + chunks,
    }))
}

/// Seconds a step spends in the teacher's forward pass: none with a cache; otherwise its
/// projections, attention and output head over every token of the step.
fn teacher_seconds(recipe: &Recipe) -> crate::error::Result<f64> {
    let Some(path) = recipe
        .distill
        .as_ref()
        .filter(|d| d.cache.is_none())
        .and_then(|d| d.teacher.as_ref())
    else {
        return Ok(0.0);
    };
    let t = config_at(path)?;
    let r = &recipe.training;
    let seq = positions(recipe) as f64;
    let tokens = seq * (r.micro_batch_size * r.gradient_accumulation_steps) as f64;
    let attention = 2.0 * seq * (t.num_heads * t.head_dim) as f64;
    let layer = 2.0 * active_layer_weights(&t) as f64 + attention;
    let head = 2.0 * (t.vocab_size * t.hidden_size) as f64;
    Ok(tokens * (t.num_layers as f64 * layer + head) / TEACHER_FLOPS_PER_S)
}

/// A model's config from a path as a recipe names it (a directory, a GGUF file, a config.json).
fn config_at(path: &str) -> crate::error::Result<ModelConfig> {
    let p = std::path::Path::new(path);
    if p.is_file() && p.extension().is_some_and(|e| e == "json") {
        return ModelConfig::from_file(p);
    }
    let dir = crate::model::source::resolve_model_path(path)?;
    crate::model::load_config(&dir)
}

/// The plan with `[distill]`'s part added.
fn with_distill(mut plan: Plan, part: Option<&Part>) -> Plan {
    if let Some(p) = part {
        plan.peak_bytes += p.bytes;
        plan.parts.push(p.clone());
    }
    plan
}

pub fn report(recipe: &Recipe, free: Option<u64>) -> crate::error::Result<Report> {
    let c = config_of(recipe)?;
    let distill = distill_part(recipe)?;
    // What the student may use: the device's free memory less distillation's part.
    let free_for_student = free.map(|f| f.saturating_sub(distill.as_ref().map_or(0, |p| p.bytes)));
    let recomputed = recomputed_for(&c, recipe, free_for_student);
    let mut plan = with_distill(plan_for(&c, recipe, recomputed), distill.as_ref());
    plan.step_seconds += teacher_seconds(recipe)?;
    let fitting = free_for_student.map(|f| largest_fitting(&c, recipe, f));
    let mut text = render(&plan, free, fitting);
    if recipe.training.gradient_checkpointing == Checkpointing::Auto {
        text += &match free {
            Some(_) => format!(
                "gradient_checkpointing = \"auto\" recomputes {recomputed} of {} layers on this device\n",
                c.num_layers
            ),
            None => "gradient_checkpointing = \"auto\": give --device cuda:N or --gpu-memory GIB to see what it keeps (shown: every layer recomputed)\n".into(),
        };
    }
    let fits = free.map(|f| plan.peak_bytes <= f);
    if fits == Some(false) {
        text += "does not fit: lower training.micro_batch_size or data.max_seq_len (the limits above), or set gradient_checkpointing = true\n";
    }
    Ok(Report {
        plan,
        free_bytes: free,
        fits,
        largest_micro_batch: fitting.map(|f| f.0),
        longest_sequence: fitting.map(|f| f.1),
        text,
    })
}

/// Free memory of a CUDA device (`None` elsewhere).
pub fn free_memory(device: &candle_core::Device) -> crate::error::Result<Option<u64>> {
    let free = crate::cuda::free_memory(device).map_err(|e| {
        crate::error::KilnError::Train(format!("cuda: cannot read free memory: {e}"))
    })?;
    Ok(free.map(|f| f as u64))
}

/// `kiln train`'s check before loading on CUDA: the recipe's least-memory plan (its policy,
/// `auto` counting every layer recomputed) must fit the free memory.
pub fn check_fits(recipe: &Recipe, device: &candle_core::Device) -> crate::error::Result<()> {
    let Some(free) = free_memory(device)? else {
        return Ok(());
    };
    let c = config_of(recipe)?;
    let least = match recipe.training.gradient_checkpointing {
        Checkpointing::Off => 0,
        _ => c.num_layers,
    };
    let distill = distill_part(recipe)?;
    let plan = with_distill(plan_for(&c, recipe, least), distill.as_ref());
    // The model errs by up to 10%: refuse only what is clearly out of reach.
    if plan.peak_bytes as f64 <= free as f64 * 1.1 {
        return Ok(());
    }
    let (micro, seq) = largest_fitting(
        &c,
        recipe,
        free.saturating_sub(distill.as_ref().map_or(0, |p| p.bytes)),
    );
    Err(crate::error::KilnError::Recipe(format!(
        "this recipe needs about {:.1} GiB of GPU memory ({} tokens a micro-batch, {} of {} layers recomputed; activations {:.1} GiB) and the device has {:.1} GiB free. With every layer recomputed it fits training.micro_batch_size up to {micro} at data.max_seq_len = {}, or data.max_seq_len up to {seq} at micro-batch 1{}; `kiln plan` shows the parts",
        gib(plan.peak_bytes),
        plan.tokens_per_micro_batch,
        least,
        c.num_layers,
        gib(plan.activation_bytes),
        gib(free),
        recipe.data.max_seq_len,
        if least == 0 { "; or set gradient_checkpointing = true" } else { "" }
    )))
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The plan as the lines `kiln plan` prints.
pub fn render(plan: &Plan, free: Option<u64>, fitting: Option<(usize, usize)>) -> String {
    let mut out = format!(
        "{} tokens a micro-batch; {} of {} layers recomputed\npredicted peak GPU memory: {:.2} GiB\n",
        plan.tokens_per_micro_batch,
        plan.recomputed_layers,
        plan.layers,
        gib(plan.peak_bytes)
    );
    for p in &plan.parts {
        out += &format!("  {:>8.2} GiB  {}\n", gib(p.bytes), p.name);
    }
    if plan.host_bytes > 0 {
        out += &format!(
            "  and {:.2} GiB of host memory: the offloaded layer inputs (pinned) and an untied model's input embeddings\n",
            gib(plan.host_bytes)
        );
    }
    out += &format!(
        "predicted step time: about {:.2} s on an H200 (at {:.0} TFLOP/s of useful work)\n",
        plan.step_seconds,
        STEP_FLOPS_PER_S / 1e12
    );
    if let Some(free) = free {
        out += &format!("device memory free: {:.2} GiB\n", gib(free));
    }
    if let Some((micro, seq)) = fitting {
        let micro = match micro {
            0 => "no micro-batch at this sequence length".to_string(),
            m => format!("micro-batch up to {m} at this sequence length"),
        };
        out += &format!(
            "fits with every layer recomputed, 10% kept as margin: {micro}; sequences up to {seq} tokens at micro-batch 1\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(config: &str, recomputed_all: bool) -> (ModelConfig, Recipe) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/configs")
            .join(config);
        let c = ModelConfig::from_file(&path).unwrap();
        let text = format!(
            "[model]\npath='x'\n[data]\npath='x'\nmax_seq_len = 2048\n[lora]\nr = 16\nlora_alpha = 32\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]\n[training]\nmicro_batch_size = 4\ngradient_accumulation_steps = 4\ngradient_checkpointing = {recomputed_all}\n[output]\ndir='x'\n"
        );
        let r = Recipe::parse(std::path::Path::new("t.toml"), &text, &[]).unwrap();
        (c, r)
    }

    /// A preference micro-batch of 4 pairs is priced as 8 sequences: the activations of an SFT
    /// micro-batch of 8; DPO's step adds its reference pass (a forward) to the time, ORPO's does
    /// not.
    #[test]
    fn a_pair_costs_two_sequences_and_dpo_a_reference_pass() {
        let (c, sft8) = recipe("Llama-3.2-1B.json", false);
        let mut sft8 = sft8;
        sft8.training.micro_batch_size = 8;
        let (_, mut dpo) = recipe("Llama-3.2-1B.json", false);
        dpo.training.method = crate::recipe::Method::Dpo;
        let mut orpo = dpo.clone();
        orpo.training.method = crate::recipe::Method::Orpo;
        let (p_sft, p_dpo) = (plan_for(&c, &sft8, 0), plan_for(&c, &dpo, 0));
        assert_eq!(p_sft.activation_bytes, p_dpo.activation_bytes);
        assert_eq!(p_sft.peak_bytes, p_dpo.peak_bytes);
        let (f_sft, f_dpo, f_orpo) = (
            step_flops(&c, &sft8, 0),
            step_flops(&c, &dpo, 0),
            step_flops(&c, &orpo, 0),
        );
        assert_eq!(f_sft, f_orpo);
        // A forward is about half a QLoRA step (the frozen base has no weight gradients).
        assert!(
            f_dpo > 1.4 * f_sft && f_dpo < 1.55 * f_sft,
            "{}",
            f_dpo / f_sft
        );
    }

    /// `[distill]` adds the teacher to the plan and to the fit: an 8B teacher in NF4 beside a 1B
    /// student takes its weights (3.35 GiB of NF4 and scales, 1.96 GiB of embeddings and head)
    /// plus a forward pass; on its own device only its head and hidden states come over; the
    /// free memory left for the student shrinks by the part.
    /// The shared job on Llama-3.2-1B, every layer recomputed, with a Llama-3.1-8B teacher in NF4.
    fn distill_recipe() -> (ModelConfig, Recipe) {
        let (c, mut r) = recipe("Llama-3.2-1B.json", true);
        let teacher = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/configs/Llama-3.1-8B.json");
        r.model.path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/configs/Llama-3.2-1B.json")
            .display()
            .to_string();
        let section = format!("[distill]\nteacher = '{}'\n", teacher.display());
        r.distill = Recipe::parse(
            std::path::Path::new("d.toml"),
            &format!("[model]\npath='x'\n[data]\npath='x'\n[output]\ndir='x'\n{section}"),
            &[],
        )
        .unwrap()
        .distill;
        (c, r)
    }

    /// The measured job (`scripts/gpu/gpu_distill.sh train`, H200, BENCHMARKS.md eighth session):
    /// 9.73 GiB and 1.433 s a step, within ±10% and ±15%; the student alone 0.521 s.
    #[test]
    fn plan_predicts_the_measured_distillation_job() {
        let (_, r) = distill_recipe();
        let p = report(&r, Some(139 << 30)).unwrap().plan;
        let (peak, step) = (gib(p.peak_bytes), p.step_seconds);
        println!("distillation: {peak:.2} GiB and {step:.3} s predicted, 9.73 and 1.433 measured");
        assert!((peak - 9.73).abs() <= 0.10 * 9.73, "{peak} GiB");
        assert!((step - 1.433).abs() <= 0.15 * 1.433, "{step} s");
        let mut cached = r.clone();
        cached.distill.as_mut().unwrap().cache = Some("cache".into());
        assert_eq!(teacher_seconds(&cached).unwrap(), 0.0);
    }

    #[test]
    fn a_distillation_teacher_is_planned_beside_the_student() {
        let (c, mut r) = distill_recipe();
        let part = distill_part(&r).unwrap().unwrap();
        let tokens = 2047 * 4;
        let weights = gib(part.bytes) - gib((8u64 << 24) * 4 - LOSS_CHUNK_LOGITS * 4);
        // 3.35 + 1.96 GiB of weights; the forward pass and hidden states of 8,188 tokens.
        let activations = (2 * (4 * 4096 + 2 * 1024) + 6 * 14336 + 4 * 4096) * tokens;
        assert!(
            (weights - 3.35 - 1.96 - gib(activations as u64)).abs() < 0.02,
            "{weights} GiB"
        );
        let report = report(&r, Some(24 << 30)).unwrap();
        let alone = plan_for(&c, &r, report.plan.recomputed_layers);
        assert_eq!(report.plan.peak_bytes, alone.peak_bytes + part.bytes);
        assert!(
            report.text.contains("distillation: the teacher"),
            "{}",
            report.text
        );
        let mut solo = r.clone();
        solo.distill = None;
        let solo = report_for_test(&solo);
        assert!(report.longest_sequence.unwrap() < solo.longest_sequence.unwrap());
        // `cuda:0` beside a student on `auto` is the same GPU.
        r.distill.as_mut().unwrap().teacher_device = Some("cuda:0".into());
        assert_eq!(distill_part(&r).unwrap().unwrap().bytes, part.bytes);
        // The teacher on its own GPU: only its head (1 GiB) and hidden states come over.
        r.distill.as_mut().unwrap().teacher_device = Some("cuda:1".into());
        let apart = distill_part(&r).unwrap().unwrap();
        assert!(
            gib(apart.bytes) < 1.6 && apart.bytes < part.bytes / 4,
            "{}",
            gib(apart.bytes)
        );
    }

    fn report_for_test(r: &Recipe) -> Report {
        report(r, Some(24 << 30)).unwrap()
    }

    /// A mixture's step costs what its routed experts cost: Qwen3-30B-A3B (3.3B active of
    /// 30.5B) plans a shorter step than the dense Qwen3-8B on the same job, and more memory.
    #[test]
    fn a_mixture_costs_its_active_experts_in_time_and_all_of_them_in_memory() {
        let (moe, r) = recipe("Qwen3-30B-A3B.json", false);
        let (dense, _) = recipe("Qwen3-8B.json", false);
        let (pm, pd) = (plan_for(&moe, &r, 0), plan_for(&dense, &r, 0));
        assert!(
            pm.step_seconds < 0.6 * pd.step_seconds,
            "{} vs {}",
            pm.step_seconds,
            pd.step_seconds
        );
        assert!(pm.peak_bytes > pd.peak_bytes);
        let active = active_layer_weights(&moe) * moe.num_layers;
        assert!((2.5e9..4.0e9).contains(&(active as f64)), "{active}");
    }

    /// The measured H200 peaks and step times (BENCHMARKS.md step 12, driver-reported, the
    /// shared bench job: 32,768 tokens a step) within ±10% and ±15%.
    #[test]
    fn plan_predicts_the_measured_peaks() {
        for (config, all, measured_gib, measured_step) in [
            ("Llama-3.2-1B.json", false, 8.73, 32768.0 / 84798.0),
            ("Llama-3.2-1B.json", true, 3.45, 32768.0 / 61626.0),
            ("Llama-3.1-8B.json", false, 32.36, 32768.0 / 16856.0),
            ("Llama-3.1-8B.json", true, 11.14, 32768.0 / 11808.0),
        ] {
            let (c, r) = recipe(config, all);
            let p = plan_for(&c, &r, if all { c.num_layers } else { 0 });
            let predicted = gib(p.peak_bytes);
            let err = (predicted - measured_gib) / measured_gib;
            assert!(
                err.abs() <= 0.10,
                "{config} recompute-all={all}: predicted {predicted:.2} GiB, measured {measured_gib} ({:+.1}%)",
                100.0 * err
            );
            let step_err = (p.step_seconds - measured_step) / measured_step;
            println!("{config} recompute-all={all}: step {:.3} s predicted, {measured_step:.3} measured ({:+.1}%)", p.step_seconds, 100.0 * step_err);
            println!("{config} recompute-all={all}: peak {predicted:.2} GiB predicted, {measured_gib} measured ({:+.1}%)", 100.0 * err);
            assert!(
                step_err.abs() <= 0.15,
                "{config} recompute-all={all}: step {:.2} s vs {measured_step} s",
                p.step_seconds
            );
        }
    }

    /// Micro-batch 1 under each checkpointing policy, measured on an H200 (BENCHMARKS.md, "Long
    /// sequences", 2026-11-30): Llama-3.2-1B and Llama-3.1-8B at 2k, 16k and 64k tokens, both at
    /// 128k offloaded, and the 8B offloaded at 160k and 288k (just past 40 GiB), within ±10%.
    #[test]
    fn plan_predicts_the_long_sequence_peaks() {
        use Checkpointing::{Off, Offload, On};
        // Micro-batch 1, one sequence a step (`bench_gpu.py --longctx`, H200, 2026-11-30).
        let mut worst = 0f64;
        for (config, seq, policy, measured_gib) in [
            ("Llama-3.2-1B.json", 2048, Off, 3.98),
            ("Llama-3.2-1B.json", 2048, On, 2.29),
            ("Llama-3.2-1B.json", 2048, Offload, 2.14),
            ("Llama-3.2-1B.json", 16384, Off, 15.58),
            ("Llama-3.2-1B.json", 16384, On, 4.98),
            ("Llama-3.2-1B.json", 16384, Offload, 3.89),
            ("Llama-3.2-1B.json", 65536, Off, 22.2),
            ("Llama-3.2-1B.json", 65536, On, 9.36),
            ("Llama-3.2-1B.json", 65536, Offload, 5.73),
            ("Llama-3.2-1B.json", 131072, Offload, 9.45),
            ("Llama-3.1-8B.json", 2048, Off, 13.23),
            ("Llama-3.1-8B.json", 2048, On, 8.08),
            ("Llama-3.1-8B.json", 2048, Offload, 6.93),
            ("Llama-3.1-8B.json", 16384, Off, 27.58),
            ("Llama-3.1-8B.json", 16384, On, 13.64),
            ("Llama-3.1-8B.json", 16384, Offload, 8.77),
            ("Llama-3.1-8B.json", 65536, Off, 84.67),
            ("Llama-3.1-8B.json", 65536, On, 29.73),
            ("Llama-3.1-8B.json", 65536, Offload, 13.93),
            ("Llama-3.1-8B.json", 131072, Offload, 21.33),
            ("Llama-3.1-8B.json", 163840, Offload, 25.08),
            ("Llama-3.1-8B.json", 294912, Offload, 40.27),
        ] {
            let (c, mut r) = recipe(config, true);
            r.training.micro_batch_size = 1;
            r.training.gradient_checkpointing = policy;
            r.data.max_seq_len = seq + 1;
            let recomputed = recomputed_for(&c, &r, None);
            let predicted = gib(plan_for(&c, &r, recomputed).peak_bytes);
            let err = (predicted - measured_gib) / measured_gib;
            println!("{config} {seq} {policy:?}: predicted {predicted:.2} GiB, measured {measured_gib} ({:+.1}%)", 100.0 * err);
            worst = worst.max(err.abs());
        }
        assert!(worst <= 0.10, "worst error {worst}");
    }

    /// Offloaded, the layer inputs move to pinned host memory but for the two on the device at a
    /// time, and an untied model's input embeddings to host memory; nothing else changes.
    #[test]
    fn offloading_moves_all_but_two_layer_inputs_to_the_host() {
        let (c, mut r) = recipe("Llama-3.1-8B.json", true);
        let on = plan_for(&c, &r, c.num_layers);
        r.training.gradient_checkpointing = Checkpointing::Offload;
        let off = plan_for(&c, &r, c.num_layers);
        let input = 2 * c.hidden_size as u64 * on.tokens_per_micro_batch as u64;
        // The 8B's head is untied: its input embeddings go to the host too.
        let embed = 2 * (c.vocab_size * c.hidden_size) as u64;
        assert_eq!(
            on.peak_bytes - off.peak_bytes,
            (c.num_layers as u64 - 2) * input + embed
        );
        assert_eq!(off.host_bytes, c.num_layers as u64 * input + embed);
        assert_eq!(on.host_bytes, 0);
        assert_eq!(recomputed_for(&c, &r, Some(1 << 40)), c.num_layers);
    }

    /// `auto` keeps as many layers as fit, and the largest fitting shapes fit while one more
    /// does not.
    #[test]
    fn auto_and_the_largest_shapes_follow_the_free_memory() {
        let (c, r) = recipe("Llama-3.1-8B.json", false);
        let mut auto = r.clone();
        auto.training.gradient_checkpointing = Checkpointing::Auto;
        let free = 20u64 << 30;
        let rec = recomputed_for(&c, &auto, Some(free));
        assert!(rec > 0 && rec < c.num_layers, "{rec}");
        let budget = free as f64 * AUTO_FIT;
        assert!(plan_for(&c, &auto, rec).peak_bytes as f64 <= budget);
        assert!(plan_for(&c, &auto, rec - 1).peak_bytes as f64 > budget);
        // On an H200 (139 GiB free) every layer is kept, as measured.
        assert_eq!(recomputed_for(&c, &auto, Some(139 << 30)), 0);
        let (micro, seq) = largest_fitting(&c, &r, free);
        let fits = |s: usize, m: usize| {
            let mut x = r.clone();
            x.data.max_seq_len = s;
            x.training.micro_batch_size = m;
            plan_for(&c, &x, c.num_layers).peak_bytes as f64 <= budget
        };
        assert!(fits(2048, micro) && !fits(2048, micro + 1), "{micro}");
        assert!(fits(seq, 1) && !fits(seq + 256, 1), "{seq}");
    }
}

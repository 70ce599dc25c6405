//! The model families kiln reads, as data: one description per family, stating its names and the
//! quirks that set it apart from Llama: Llama itself (and models in its layout), Mistral (an
//! optional sliding window), Mixtral (Mistral with a sparse mixture of experts), Qwen 2 / 2.5
//! (q/k/v biases), Qwen 3 (per-head q/k norms, explicit head_dim), Qwen3-MoE (Qwen 3 with experts
//! in every layer's `mlp`), Phi-3 / Phi-4 (fused projections), SmolLM3 (no rotation on every fourth layer), and the Gemmas ((1 + w) norms,
//! scaled embeddings; Gemma 2 and 3: four norms a block, soft caps, local/global layers). Config parsing, loading and GGUF naming read these; code
//! exists only where a family brings new math (llama.cpp's `MODEL_TENSORS[arch]` tables are the
//! model). Adding a family with no new math is one entry here and its tests.

use super::config::{Activation, MoeLayout};

/// A mixture of experts' defaults, where config.json leaves them out (transformers' defaults).
#[derive(Debug, Clone, Copy)]
pub struct ExpertDefaults {
    /// Experts in a layer.
    pub experts: usize,
    /// Experts each token is routed to.
    pub per_token: usize,
    /// An expert's own width (`moe_intermediate_size`, this by default); `None`: the dense
    /// `intermediate_size`.
    pub width: Option<usize>,
    /// Whether the picked experts' weights are renormalized: `None` always; `Some(d)` as
    /// config.json's `norm_topk_prob` says, `d` by default.
    pub renormalize: Option<bool>,
    /// Where the router and experts sit in a checkpoint.
    pub layout: MoeLayout,
}

/// One family.
#[derive(Debug)]
pub struct Family {
    /// config.json's `model_type`.
    pub model_type: &'static str,
    /// llama.cpp's `general.architecture` (Mistral and Mixtral are `llama` there).
    pub gguf_arch: &'static str,
    /// Norms multiply by (1 + w) and embeddings by √hidden (the Gemmas).
    pub gemma_norms: bool,
    /// Four norms a block: around attention and around the feed-forward (Gemma 2 and 3).
    pub sandwich_norms: bool,
    /// One `qkv_proj` and one `gate_up_proj` a layer (Phi-3).
    pub fused_projections: bool,
    /// An RMSNorm over each query and key head before RoPE (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// q/k/v biases whatever config.json says (Qwen 2's config does not say).
    pub qkv_bias: bool,
    /// Embeddings tied when config.json does not say (transformers' class default).
    pub tied_by_default: bool,
    /// Reads config.json's `sliding_window` (others ignore it, as transformers does).
    pub sliding_window: bool,
    /// Every `n`-th layer attends globally and the others through the window, unless config.json
    /// lists `layer_types` (Gemma 2: 2, Gemma 3: 6). `None`: every layer uses the window.
    pub global_every: Option<usize>,
    /// The local layers rotate with their own base and no scaling (Gemma 3).
    pub local_rope: bool,
    /// Every `n`-th layer has no rotary embedding (SmolLM3's "NoPE") unless config.json's
    /// `no_rope_layers` lists which rotate. llama.cpp's architecture fixes `n`.
    pub no_rope_every: Option<usize>,
    /// A sparse mixture of experts in every layer.
    pub experts: Option<ExpertDefaults>,
    /// The MLP's activation where the file does not say (GGUF files never do).
    pub activation: Activation,
    /// llama.cpp's architecture reads q and k with their rows permuted for its interleaved
    /// rotation (`llama`, `smollm3`); the others rotate halves, as Hugging Face does.
    pub gguf_permuted_qk: bool,
    /// llama.cpp's architecture applies the sliding window (`gemma2`, `gemma3`; its `llama` has
    /// none and its `phi3` turns it off).
    pub gguf_window: bool,
}

const LLAMA: Family = Family {
    model_type: "llama",
    gguf_arch: "llama",
    gemma_norms: false,
    sandwich_norms: false,
    fused_projections: false,
    qk_norm: false,
    qkv_bias: false,
    tied_by_default: false,
    sliding_window: false,
    global_every: None,
    local_rope: false,
    no_rope_every: None,
    experts: None,
    activation: Activation::Silu,
    gguf_permuted_qk: true,
    gguf_window: false,
};

/// Qwen 2 and later: llama.cpp rotates their halves as Hugging Face does, with no permutation.
const QWEN2: Family = Family {
    model_type: "qwen2",
    gguf_arch: "qwen2",
    gguf_permuted_qk: false,
    ..LLAMA
};

/// The Gemmas: (1 + w) norms, scaled embeddings, GeGLU, tied embeddings.
const GEMMA: Family = Family {
    model_type: "gemma",
    gguf_arch: "gemma",
    gemma_norms: true,
    tied_by_default: true,
    activation: Activation::GeluTanh,
    gguf_permuted_qk: false,
    ..LLAMA
};

/// Every family kiln reads.
pub const FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        model_type: "mistral",
        sliding_window: true,
        ..LLAMA
    },
    Family {
        model_type: "mixtral",
        sliding_window: true,
        experts: Some(ExpertDefaults {
            experts: 8,
            per_token: 2,
            width: None,
            renormalize: None,
            layout: MoeLayout::MIXTRAL,
        }),
        ..LLAMA
    },
    Family {
        model_type: "smollm3",
        gguf_arch: "smollm3",
        no_rope_every: Some(4),
        ..LLAMA
    },
    Family {
        qkv_bias: true,
        ..QWEN2
    },
    Family {
        model_type: "qwen3",
        gguf_arch: "qwen3",
        qk_norm: true,
        ..QWEN2
    },
    Family {
        model_type: "qwen3_moe",
        gguf_arch: "qwen3moe",
        qk_norm: true,
        experts: Some(ExpertDefaults {
            experts: 128,
            per_token: 8,
            width: Some(768),
            renormalize: Some(false),
            layout: MoeLayout::QWEN3_MOE,
        }),
        ..QWEN2
    },
    Family {
        model_type: "phi3",
        gguf_arch: "phi3",
        fused_projections: true,
        sliding_window: true,
        ..QWEN2
    },
    GEMMA,
    Family {
        model_type: "gemma2",
        gguf_arch: "gemma2",
        sandwich_norms: true,
        sliding_window: true,
        global_every: Some(2),
        gguf_window: true,
        ..GEMMA
    },
    Family {
        model_type: "gemma3_text",
        gguf_arch: "gemma3",
        sandwich_norms: true,
        qk_norm: true,
        sliding_window: true,
        global_every: Some(6),
        local_rope: true,
        gguf_window: true,
        ..GEMMA
    },
];

/// The family of config.json's `model_type`.
pub fn by_model_type(model_type: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.model_type == model_type)
}

/// The family a GGUF file's `general.architecture` stands for (`llama` files with experts are
/// Mixtral).
pub fn by_gguf_arch(arch: &str, has_experts: bool) -> Option<&'static Family> {
    match (arch, has_experts) {
        ("llama", true) => by_model_type("mixtral"),
        _ => FAMILIES.iter().find(|f| f.gguf_arch == arch),
    }
}

/// The GGUF architectures kiln reads and writes.
pub fn gguf_arches() -> Vec<&'static str> {
    let mut arches: Vec<&str> = FAMILIES.iter().map(|f| f.gguf_arch).collect();
    arches.sort();
    arches.dedup();
    arches
}

/// The `model_type`s kiln reads, for messages.
pub fn model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type).collect()
}

//! Every GGUF metadata key kiln reads or writes, named once (as gguf-py's `constants.py` names
//! them). Keys of an architecture's hyperparameters are `{arch}.{suffix}`, the suffixes in [`llm`].

/// `general.*`: what the file is.
pub mod general {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const TYPE: &str = "general.type";
    pub const ALIGNMENT: &str = "general.alignment";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
}

/// `tokenizer.*`: the vocabulary and the chat template.
pub mod tokenizer {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// `adapter.*`: a LoRA adapter file.
pub mod adapter {
    pub const TYPE: &str = "adapter.type";
    pub const LORA_ALPHA: &str = "adapter.lora.alpha";
}

/// `imatrix.*`: an importance-matrix file.
pub mod imatrix {
    pub const DATASETS: &str = "imatrix.datasets";
    pub const CHUNK_COUNT: &str = "imatrix.chunk_count";
    pub const CHUNK_SIZE: &str = "imatrix.chunk_size";
}

/// Suffixes of an architecture's hyperparameter keys: `{arch}.{suffix}`.
pub mod llm {
    pub const ATTENTION_HEAD_COUNT: &str = "attention.head_count";
    pub const ATTENTION_HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const ATTENTION_KEY_LENGTH: &str = "attention.key_length";
    pub const ATTENTION_LAYER_NORM_RMS_EPSILON: &str = "attention.layer_norm_rms_epsilon";
    pub const ATTENTION_SLIDING_WINDOW: &str = "attention.sliding_window";
    pub const ATTENTION_SLIDING_WINDOW_PATTERN: &str = "attention.sliding_window_pattern";
    pub const ATTENTION_VALUE_LENGTH: &str = "attention.value_length";
    pub const ATTN_LOGIT_SOFTCAPPING: &str = "attn_logit_softcapping";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const EXPERT_COUNT: &str = "expert_count";
    pub const EXPERT_FEED_FORWARD_LENGTH: &str = "expert_feed_forward_length";
    pub const EXPERT_USED_COUNT: &str = "expert_used_count";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const FINAL_LOGIT_SOFTCAPPING: &str = "final_logit_softcapping";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const ROPE_FREQ_BASE_SWA: &str = "rope.freq_base_swa";
    pub const ROPE_SCALING_ATTN_FACTOR: &str = "rope.scaling.attn_factor";
    pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
    pub const ROPE_SCALING_ORIGINAL_CONTEXT_LENGTH: &str = "rope.scaling.original_context_length";
    pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
    pub const VOCAB_SIZE: &str = "vocab_size";
}

//! The recipe: one TOML file with sections `[model]`, `[data]`, `[lora]`, `[training]`,
//! `[output]`. Unknown keys and bad values are errors that name the key and the allowed values.
//! Key names follow PEFT, TRL and axolotl.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{KilnError, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub training: TrainingSection,
    pub output: OutputSection,
    /// Distillation from a frozen teacher (`[distill]`; absent: plain supervised fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSection>,
    /// The preference methods' settings (`[preference]`, with `training.method` = dpo, orpo or
    /// simpo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceSection>,
    /// What a run writes for people to look at (`[logging]`).
    #[serde(default, skip_serializing_if = "LoggingSection::is_default")]
    pub logging: LoggingSection,
}

/// `[logging]`: beside `metrics.jsonl`, TensorBoard event files under `OUTPUT_DIR/tensorboard/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Write TensorBoard event files (`tensorboard --logdir OUTPUT_DIR/tensorboard`).
    #[serde(default = "default_true")]
    pub tensorboard: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self { tensorboard: true }
    }
}

impl LoggingSection {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What training optimizes (`[training] method`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Supervised fine-tuning: cross-entropy on the target tokens (or `[distill]`).
    #[default]
    Sft,
    /// Direct Preference Optimization: the policy against the adapter-off base as reference.
    Dpo,
    /// Odds Ratio Preference Optimization: NLL on the chosen plus λ times the log odds ratio.
    Orpo,
    /// Simple Preference Optimization: per-token averaged log-probabilities with a margin γ.
    Simpo,
    /// Kahneman-Tversky Optimization: unpaired completions labelled desirable or not.
    Kto,
}

impl Method {
    /// Whether the method trains on preference pairs.
    pub fn is_preference(self) -> bool {
        self != Method::Sft
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Orpo => "orpo",
            Method::Simpo => "simpo",
            Method::Kto => "kto",
        }
    }
}

/// `[preference]`: the settings of DPO, ORPO and SimPO, with TRL 1.15's names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreferenceSection {
    /// DPO's β (how far from the reference the policy may go), SimPO's β, ORPO's λ. Default
    /// 0.1 (TRL's for all three; the SimPO paper uses 2 to 2.5).
    #[serde(default = "default_pref_beta")]
    pub beta: f64,
    /// DPO's loss: `sigmoid` (the paper's), `ipo`, `hinge` or `robust`.
    #[serde(default = "default_dpo_loss")]
    pub loss_type: DpoKind,
    /// DPO `robust` and SimPO: the assumed share of flipped labels, in [0, 0.5).
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target margin γ between the chosen and rejected averages.
    #[serde(default = "default_simpo_gamma")]
    pub simpo_gamma: f64,
    /// KTO: the weights of desirable and undesirable examples' losses (TRL suggests keeping
    /// desirable × count ÷ (undesirable × count) between 1 and 4/3).
    #[serde(default = "default_kto_weight")]
    pub desirable_weight: f64,
    #[serde(default = "default_kto_weight")]
    pub undesirable_weight: f64,
    /// DPO: compute the reference's log-probabilities of every training pair once, before the
    /// first step (kept beside the run in `reference_logps.json`), so each step runs the model
    /// once instead of twice.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// A pair longer than `data.max_seq_len`: `keep_start` cuts its end, `keep_end` its start
    /// (TRL's `truncation_mode`); with `keep_start` a pair whose prompt fills the length is
    /// dropped, as TRL drops it.
    #[serde(default)]
    pub truncation_mode: Truncation,
    /// The adapter's dropout is off while a preference method trains, as TRL's
    /// `disable_dropout` (default on) turns it off: the policy's log-probabilities are then those
    /// the reference's are compared with. `adapter_config.json` keeps `lora.lora_dropout`.
    #[serde(default = "default_true")]
    pub disable_dropout: bool,
}

impl Default for PreferenceSection {
    fn default() -> Self {
        toml::from_str("").expect("every preference key has a default")
    }
}

/// Which end of an overlong pair's sequences is kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    #[default]
    KeepStart,
    KeepEnd,
}

/// DPO's loss types (`DPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoKind {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
}

fn default_pref_beta() -> f64 {
    0.1
}

fn default_dpo_loss() -> DpoKind {
    DpoKind::Sigmoid
}

fn default_simpo_gamma() -> f64 {
    0.5
}

fn default_true() -> bool {
    true
}

fn default_kto_weight() -> f64 {
    1.0
}

/// `[distill]`: the loss becomes `alpha · T² · D(teacher_T ‖ student_T) + (1 − alpha) · CE` on the
/// target tokens, D the chosen divergence of the two models' distributions at temperature T.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher: a Hugging Face model directory (or a GGUF file) sharing the student's
    /// tokenizer. Not needed when `cache` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// A PEFT adapter applied to the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_adapter: Option<String>,
    /// How the frozen teacher is held: `nf4` (4-bit, least memory) or `none` (compute dtype).
    #[serde(default)]
    pub teacher_quantize: Quantize,
    /// Where the teacher runs (`cuda:1`, ...; `kiln train --teacher-device`); default: the
    /// student's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_device: Option<String>,
    /// The divergence's weight; `1 − alpha` weighs the cross-entropy on the data.
    #[serde(default = "default_distill_alpha")]
    pub alpha: f64,
    /// Both models' logits are divided by it before the softmax (and the divergence multiplied by
    /// its square, so its gradients keep their scale).
    #[serde(default = "default_distill_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub loss: DistillLoss,
    /// Read the teacher's top-k log-probabilities from this directory (`kiln distill cache`)
    /// instead of running the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// Log-probabilities per target token that `kiln distill cache` keeps.
    #[serde(default = "default_distill_top_k")]
    pub top_k: usize,
}

fn default_distill_alpha() -> f64 {
    0.5
}
fn default_distill_temperature() -> f64 {
    2.0
}
fn default_distill_top_k() -> usize {
    64
}

/// The divergence `[distill]` minimizes between the teacher's distribution p and the student's q.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DistillLoss {
    /// KL(p ‖ q): the student covers everything the teacher considers (mean-seeking).
    #[default]
    ForwardKl,
    /// KL(q ‖ p): the student puts its mass where the teacher does (mode-seeking).
    ReverseKl,
    /// Jensen–Shannon: ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2 (bounded, symmetric).
    Jsd,
}

impl DistillLoss {
    pub fn name(self) -> &'static str {
        match self {
            DistillLoss::ForwardKl => "forward_kl",
            DistillLoss::ReverseKl => "reverse_kl",
            DistillLoss::Jsd => "jsd",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory, or `tiny:llama` for a small random model made on first use.
    pub path: String,
    /// `nf4` (QLoRA: base weights in 4-bit) or `none` (base weights in the compute dtype).
    #[serde(default)]
    pub quantize: Quantize,
    /// `auto` (bf16 on GPU, f32 on CPU), `f32`, `bf16` or `f16`.
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
    /// `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Random weights of config.json's shapes instead of the checkpoint (benchmarks on real
    /// architectures without downloads; the directory needs only config.json and a tokenizer).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub random_weights: bool,
    /// Keep only the model's first N decoder layers: a draft for speculative decoding made of
    /// the model's own layers, trained (with `[distill]`, the whole model as teacher) to predict
    /// what the whole model would (`kiln generate --draft MODEL --draft-layers N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    #[default]
    Nf4,
    None,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    /// The dtype on `device` (`auto`: f32 on the CPU, bf16 on a GPU).
    pub fn on(self, device: &candle_core::Device) -> candle_core::DType {
        use candle_core::DType;
        match self {
            ComputeDtype::Auto => crate::device::auto_dtype(device),
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }
}

fn default_device() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Dataset files (`.jsonl`, `.json` holding an array, `.parquet`), one or a list, or a
    /// directory: then the files of `split` in it (`train.jsonl`, `data/train-*.parquet`, ...).
    /// Relative paths are relative to the working directory.
    pub path: OneOrMany,
    /// Which split to read when `path` is a directory (default `train`).
    #[serde(default = "default_split")]
    pub split: String,
    /// Validation files. Without them, `val_split` holds out part of the training rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_path: Option<OneOrMany>,
    /// Rows held out for validation: a fraction in (0, 1), or a row count of 1 or more.
    #[serde(default)]
    pub val_split: f64,
    /// `auto` (detected from the rows' fields), `alpaca`, `messages`, `sharegpt`,
    /// `prompt_completion` or `text`.
    #[serde(default)]
    pub format: DataFormat,
    /// Column names, when the dataset's differ from the format's (e.g. GSM8K:
    /// `prompt = "question"`, `completion = "answer"`).
    #[serde(default)]
    pub fields: FieldNames,
    /// Extra role names and what they mean, e.g. `{ bot = "assistant" }`. Built in: user, human;
    /// assistant, gpt, bot, model; system; tool, observation, function_response;
    /// function_call (an assistant turn).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub roles: std::collections::BTreeMap<String, String>,
    /// `auto` (the model's own template for conversations; the plain prompt for alpaca and
    /// prompt_completion rows), `model` (the model's own for every format), a built-in
    /// (`alpaca`, `chatml`, `llama3`, `phi3`, `mistral`, `gemma`), a `.jinja` file, or `none`.
    #[serde(default = "default_template")]
    pub chat_template: String,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// What to do with examples longer than `max_seq_len`: `truncate` or `drop`.
    #[serde(default)]
    pub overlong: Overlong,
    /// Train on prompt tokens too (default: only assistant / completion tokens carry loss).
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Which assistant turns of a conversation carry loss: `all` (default; with a template that
    /// renders earlier turns differently once later ones exist, such as Qwen 3's dropping their
    /// reasoning, each turn becomes its own example rendered with it last), or `last` (only the
    /// final assistant turn, one example per conversation).
    #[serde(default)]
    pub train_turns: TrainTurns,
    /// Put the model's BOS token in front of plain rows (text, alpaca and prompt/completion
    /// rendered without a chat template) when the tokenizer does not add one itself. Off by
    /// default: plain rows are `tokenizer(text) + [eos]`, as transformers and TRL make them.
    #[serde(default)]
    pub add_bos: bool,
    /// Pack several examples into each `max_seq_len` sequence (no attention across them).
    #[serde(default)]
    pub packing: bool,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Skip rows that cannot be read (bad JSON, missing fields, unknown roles) and count them,
    /// instead of stopping with an error naming the row.
    #[serde(default)]
    pub skip_bad_rows: bool,
}

impl DataSection {
    /// A data section for a command (eval, merge, generate): `paths` with the recipe defaults,
    /// then `extra` keys (named as in a recipe's `[data]`).
    pub fn for_command(paths: &[String], extra: toml::Table) -> Result<Self> {
        let mut table = extra;
        table.insert(
            "path".into(),
            toml::Value::Array(paths.iter().cloned().map(toml::Value::String).collect()),
        );
        table
            .entry("shuffle")
            .or_insert(toml::Value::Boolean(false));
        Self::deserialize(toml::Value::Table(table))
            .map_err(|e| KilnError::Usage(format!("data options: {e}")))
    }
}

/// `training.gradient_checkpointing`: `true`, `false`, `"auto"` or `"offload"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Every decoder layer is recomputed.
    On,
    /// No layer is recomputed.
    Off,
    /// As few layers as the device's free memory allows (CUDA); every layer elsewhere.
    #[default]
    Auto,
    /// Every layer recomputed, its input kept in pinned host memory instead of on the GPU
    /// (CUDA's explicit step; elsewhere the same as `On`).
    Offload,
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Checkpointing::On => s.serialize_bool(true),
            Checkpointing::Off => s.serialize_bool(false),
            Checkpointing::Auto => s.serialize_str("auto"),
            Checkpointing::Offload => s.serialize_str("offload"),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Checkpointing::On),
            Raw::Bool(false) => Ok(Checkpointing::Off),
            Raw::Text(t) => match t.as_str() {
                "auto" => Ok(Checkpointing::Auto),
                "offload" => Ok(Checkpointing::Offload),
                "true" => Ok(Checkpointing::On),
                "false" => Ok(Checkpointing::Off),
                other => Err(serde::de::Error::custom(format!(
                    "gradient_checkpointing = \"{other}\": expected true, false, \"auto\" or \"offload\""
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    #[default]
    Auto,
    Alpaca,
    Messages,
    Sharegpt,
    PromptCompletion,
    Text,
    /// Already tokenized: `input_ids`, and optionally `labels` (-100 for tokens without loss).
    Tokens,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Messages => "messages",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::PromptCompletion => "prompt_completion",
            DataFormat::Text => "text",
            DataFormat::Tokens => "tokens",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainTurns {
    #[default]
    All,
    Last,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    #[default]
    Truncate,
    Drop,
}

/// Column and key names of the dataset. Unset message keys default to the format's
/// (`role`/`content` for messages, `from`/`value` for sharegpt).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FieldNames {
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub prompt: String,
    pub completion: String,
    pub text: String,
    pub messages: String,
    pub conversations: String,
    /// An optional per-row system prompt column (alpaca, prompt_completion).
    pub system: String,
    /// An optional per-row tool list (JSON array, or a string holding one) passed to the template.
    pub tools: String,
    /// Token ids of pre-tokenized rows (format `tokens`), and their optional labels.
    pub input_ids: String,
    pub labels: String,
    /// KTO: whether an unpaired row's completion is desirable (a boolean).
    pub label: String,
    /// A preference pair's preferred and dispreferred completions.
    pub chosen: String,
    pub rejected: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Default for FieldNames {
    fn default() -> Self {
        Self {
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            text: "text".into(),
            messages: "messages".into(),
            conversations: "conversations".into(),
            system: "system".into(),
            tools: "tools".into(),
            input_ids: "input_ids".into(),
            labels: "labels".into(),
            label: "label".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            role: None,
            content: None,
        }
    }
}

fn default_split() -> String {
    "train".into()
}
fn default_template() -> String {
    "auto".into()
}
fn default_max_seq_len() -> usize {
    2048
}
fn yes() -> bool {
    true
}

/// Projection names LoRA can target, across architectures (Phi-3 fuses `qkv_proj` and
/// `gate_up_proj`). `all-linear` means all of them; the model keeps those it has.
pub const LINEAR_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    /// Module names, or `"all-linear"`.
    #[serde(default = "default_targets")]
    pub target_modules: OneOrMany,
    #[serde(default)]
    pub use_rslora: bool,
    /// A PEFT adapter to start from (continued training) instead of a fresh initialisation; its
    /// r, target modules and rsLoRA setting must match this section's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_targets() -> OneOrMany {
    OneOrMany::Many(
        ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
    )
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
            init_adapter: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    Linear,
    #[default]
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// `sft` (default), or a preference method: `dpo`, `orpo`, `simpo` (settings in
    /// `[preference]`; the data are pairs).
    #[serde(default)]
    pub method: Method,
    /// Sequences a micro-batch holds; with a preference method, pairs.
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub lr_scheduler: Scheduler,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Optimizer steps to run; 0 means `num_epochs` passes over the data.
    #[serde(default)]
    pub max_steps: usize,
    #[serde(default = "one")]
    pub num_epochs: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Recompute decoder layers in the backward pass instead of keeping their activations:
    /// `true` (every layer: least memory, about a third more compute), `false` (none),
    /// `"auto"` (on CUDA, as few as the device's free memory allows; elsewhere every layer), or
    /// `"offload"` (every layer, their inputs in pinned host memory: long sequences on CUDA).
    #[serde(default)]
    pub gradient_checkpointing: Checkpointing,
    #[serde(default = "one")]
    pub logging_steps: usize,
    /// Save the adapter every N optimizer steps (0: only at the end).
    #[serde(default)]
    pub save_steps: usize,
    /// Keep only the newest N `checkpoint-*` directories (0: keep all).
    #[serde(default)]
    pub save_total_limit: usize,
    /// Continue from the newest checkpoint in output.dir (`kiln train --resume`).
    #[serde(default)]
    pub resume: bool,
    /// Resume even when the recipe or the base model differs from the checkpoint's.
    #[serde(default)]
    pub force_resume: bool,
    /// Evaluate the loss on the validation data (data.val_split / data.val_path) every N steps
    /// and at the end (0: never).
    #[serde(default)]
    pub eval_steps: usize,
    /// Evaluate once before the first step too (TRL's `eval_on_start`): the starting point.
    #[serde(default)]
    pub eval_on_start: bool,
    /// Keep the adapter with the lowest validation loss in `output.dir/best`.
    #[serde(default)]
    pub save_best: bool,
    /// Prompts to generate from at each evaluation (through the chat template when the data
    /// uses one), printed and written to `output.dir/samples.jsonl`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sample_prompts: Vec<String>,
    #[serde(default = "default_sample_tokens")]
    pub sample_max_new_tokens: usize,
    /// A step whose loss or gradient is NaN or infinite: `skip` it (no update), or `stop`.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// With `skip`: stop after this many such steps in a row.
    #[serde(default = "default_max_nonfinite")]
    pub max_nonfinite_steps: usize,
    /// GPUs on this host to train on, one process each (`kiln train --gpus N`); every step then
    /// takes `micro_batch_size × gradient_accumulation_steps × gpus` sequences. Under torchrun,
    /// srun or mpirun the launcher's WORLD_SIZE decides instead.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub gpus: usize,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn default_sample_tokens() -> usize {
    64
}

fn default_max_nonfinite() -> usize {
    3
}

/// What a NaN or infinite loss or gradient does to training.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Skip the step's update and go on (stopping after `max_nonfinite_steps` in a row).
    #[default]
    Skip,
    /// Stop training at once.
    Stop,
}

fn default_micro_batch() -> usize {
    4
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}

impl Default for TrainingSection {
    fn default() -> Self {
        toml::from_str("").expect("every training key has a default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Directory for checkpoints, the final adapter and metrics.jsonl.
    pub dir: PathBuf,
}

fn recipe_err(file: &Path, msg: impl std::fmt::Display) -> KilnError {
    KilnError::Recipe(format!("{}: {msg}", file.display()))
}

/// Sets `key` (dotted, e.g. `training.learning_rate`) to `value` (TOML syntax; a bare word is a
/// string) in `table`.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment.split_once('=').ok_or_else(|| {
        KilnError::Usage(format!(
            "--set expects KEY=VALUE (e.g. training.learning_rate=1e-4), got `{assignment}`"
        ))
    })?;
    let key = key.trim();
    let value = value.trim();
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(KilnError::Usage(format!(
            "--set key `{key}` must be SECTION.KEY, e.g. training.max_steps or data.fields.prompt; sections: model, data, lora, training, output"
        )));
    }
    set_value(table, key, parsed)
}

/// Sets recipe key `key` (SECTION.KEY, or deeper) to `value` in `table`: a typed override, as
/// command-line flags give them (`--device cuda:1` is `model.device`).
pub fn set_value(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, tables) = parts.split_last().expect("two or more parts");
    let mut current = table;
    for name in tables {
        current = current
            .entry(name.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| {
                KilnError::Usage(format!("--set: `{name}` in `{key}` is not a table"))
            })?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

impl Recipe {
    /// Reads, overrides and validates a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::load_with(path, overrides, &[])
    }

    /// Reads a recipe file with `--set` overrides (`sets`), then the typed values of
    /// command-line flags (`typed`: recipe key and value), which win.
    pub fn load_with(path: &Path, sets: &[String], typed: &[(&str, toml::Value)]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                KilnError::Recipe(format!("{}: recipe file not found", path.display()))
            }
            _ => KilnError::io(path, e),
        })?;
        Self::parse_with(path, &text, sets, typed)
    }

    pub fn parse(path: &Path, text: &str, overrides: &[String]) -> Result<Self> {
        Self::parse_with(path, text, overrides, &[])
    }

    fn parse_with(
        path: &Path,
        text: &str,
        sets: &[String],
        typed: &[(&str, toml::Value)],
    ) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| recipe_err(path, e))?;
        for o in sets {
            apply_override(&mut table, o)?;
        }
        for (key, value) in typed {
            set_value(&mut table, key, value.clone())?;
        }
        for (section, value) in &table {
            if ![
                "model",
                "data",
                "lora",
                "training",
                "output",
                "distill",
                "preference",
            ]
            .contains(&section.as_str())
            {
                return Err(recipe_err(
                    path,
                    format!("unknown section `[{section}]`; sections are model, data, lora, training, output, distill, preference"),
                ));
            }
            if !value.is_table() {
                return Err(recipe_err(
                    path,
                    format!("`{section}` must be a section ([{section}])"),
                ));
            }
        }
        for required in ["model", "data", "output"] {
            if !table.contains_key(required) {
                return Err(recipe_err(path, format!("missing section `[{required}]`")));
            }
        }
        // Without overrides, parse the text itself so errors carry its line and column.
        let recipe: Recipe = if sets.is_empty() && typed.is_empty() {
            toml::from_str(text).map_err(|e| recipe_err(path, e))?
        } else {
            Recipe::deserialize(toml::Value::Table(table)).map_err(|e| recipe_err(path, e))?
        };
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// `[preference]` only with a preference method, and its values in range.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate_preference(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(recipe_err(path, format!("`{key}` {msg}")));
        let method = self.training.method;
        let Some(p) = &self.preference else {
            return Ok(());
        };
        if !method.is_preference() {
            return bad(
                "preference",
                "applies to the preference methods: set training.method = \"dpo\", \"orpo\", \"simpo\" or \"kto\"".into(),
            );
        }
        if self.distill.is_some() {
            return bad(
                "distill",
                format!(
                    "does not combine with training.method = \"{}\"",
                    method.name()
                ),
            );
        }
        if !(p.beta > 0.0) {
            return bad(
                "preference.beta",
                "must be positive (TRL's default: 0.1)".into(),
            );
        }
        if method == Method::Kto && self.training.micro_batch_size < 2 {
            return bad(
                "training.micro_batch_size",
                "must be at least 2 with KTO: its KL estimate pairs each example's prompt with another's completion in the micro-batch".into(),
            );
        }
        if !(p.desirable_weight > 0.0 && p.undesirable_weight > 0.0) {
            return bad(
                "preference.desirable_weight/undesirable_weight",
                "must be positive".into(),
            );
        }
        if !(0.0..0.5).contains(&p.label_smoothing) {
            return bad("preference.label_smoothing", "must be in [0, 0.5)".into());
        }
        Ok(())
    }

    // `!(x > 0.0)` is meant: it also rejects NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: &str| Err(recipe_err(path, format!("`{key}` {msg}")));
        let l = &self.lora;
        if l.r == 0 {
            return bad("lora.r", "must be at least 1 (typical: 8, 16, 32, 64)");
        }
        if !(l.lora_alpha > 0.0) {
            return bad("lora.lora_alpha", "must be positive (typical: r or 2*r)");
        }
        if !(0.0..1.0).contains(&l.lora_dropout) {
            return bad(
                "lora.lora_dropout",
                "must be in [0, 1) (typical: 0.0 or 0.05)",
            );
        }
        self.target_modules().map_err(|m| recipe_err(path, m))?;
        self.validate_preference(path)?;
        let t = &self.training;
        if t.micro_batch_size == 0 {
            return bad("training.micro_batch_size", "must be at least 1");
        }
        if t.gradient_accumulation_steps == 0 {
            return bad("training.gradient_accumulation_steps", "must be at least 1");
        }
        if t.gpus == 0 {
            return bad("training.gpus", "must be at least 1 (kiln train --gpus N)");
        }
        if !(t.learning_rate > 0.0 && t.learning_rate < 1.0) {
            return bad(
                "training.learning_rate",
                "must be in (0, 1) (typical QLoRA: 1e-4 to 3e-4)",
            );
        }
        if t.max_steps == 0 && t.num_epochs == 0 {
            return bad(
                "training.num_epochs",
                "must be at least 1 when training.max_steps is 0",
            );
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return bad("training.adam_beta1/adam_beta2", "must be in [0, 1)");
        }
        if !(t.adam_epsilon > 0.0) {
            return bad("training.adam_epsilon", "must be positive");
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            return bad(
                "training.weight_decay/max_grad_norm",
                "must not be negative",
            );
        }
        if t.logging_steps == 0 {
            return bad("training.logging_steps", "must be at least 1");
        }
        if (t.save_best || !t.sample_prompts.is_empty()) && t.eval_steps == 0 {
            return bad(
                "training.eval_steps",
                "must be set (e.g. 50) for training.save_best or training.sample_prompts: they happen at each evaluation",
            );
        }
        if t.eval_steps > 0 && self.data.val_split == 0.0 && self.data.val_path.is_none() {
            return bad(
                "training.eval_steps",
                "needs validation data: set data.val_split (e.g. 0.05) or data.val_path",
            );
        }
        if self.data.max_seq_len < 2 {
            return bad("data.max_seq_len", "must be at least 2");
        }
        if self.data.path.to_vec().is_empty() {
            return bad("data.path", "must name at least one file");
        }
        let v = self.data.val_split;
        if !(v >= 0.0) || (v >= 1.0 && v.fract() != 0.0) {
            return bad(
                "data.val_split",
                "must be a fraction in [0, 1) or a whole number of rows (e.g. 0.05 or 200)",
            );
        }
        if v > 0.0 && self.data.val_path.is_some() {
            return bad(
                "data.val_split",
                "cannot be used together with data.val_path; choose one",
            );
        }
        crate::device::parse_device_spec(&self.model.device)
            .map_err(|m| recipe_err(path, format!("`model.device` {m}")))?;
        if self.model.layers == Some(0) {
            return bad(
                "model.layers",
                "must be at least 1 (or left out: every layer)",
            );
        }
        if let Some(d) = &self.distill {
            if !(0.0..=1.0).contains(&d.alpha) {
                return bad(
                    "distill.alpha",
                    "must be in [0, 1]: the divergence's weight (typical: 0.5; 1 = teacher only)",
                );
            }
            if !(d.temperature > 0.0) {
                return bad("distill.temperature", "must be positive (typical: 1 to 4)");
            }
            if d.top_k == 0 {
                return bad("distill.top_k", "must be at least 1 (typical: 32 to 128)");
            }
            if d.teacher.is_none() && d.cache.is_none() {
                return bad(
                    "distill.teacher",
                    "is missing: name the teacher model (teacher = \"DIR\"), or a cache of its log-probabilities from `kiln distill cache` (cache = \"DIR\")",
                );
            }
            if let Some(dev) = &d.teacher_device {
                crate::device::parse_device_spec(dev)
                    .map_err(|m| recipe_err(path, format!("`distill.teacher_device` {m}")))?;
            }
        }
        Ok(())
    }

    /// The module names LoRA targets, with `all-linear` expanded.
    pub fn target_modules(&self) -> std::result::Result<Vec<String>, String> {
        let names = match &self.lora.target_modules {
            OneOrMany::One(s) if s == "all-linear" => {
                return Ok(LINEAR_MODULES.iter().map(|s| s.to_string()).collect())
            }
            other => other.to_vec(),
        };
        if names.is_empty() {
            return Err("`lora.target_modules` is empty; name modules (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\"".into());
        }
        for n in &names {
            if !LINEAR_MODULES.contains(&n.as_str()) {
                return Err(format!(
                    "`lora.target_modules` has unknown module `{n}`; allowed: {}, or \"all-linear\"",
                    LINEAR_MODULES.join(", ")
                ));
            }
        }
        Ok(names)
    }
}

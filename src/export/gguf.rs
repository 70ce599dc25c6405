//! `kiln export gguf` and `kiln export gguf-adapter`: llama.cpp/Ollama files from a model
//! directory (optionally with its adapter merged in) or from a PEFT adapter, an Ollama
//! Modelfile beside each, and the fidelity of the result read back.

use crate::gguf::keys;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::error::{KilnError, Result};
use crate::export::gguf_types::{choose_types, Preset};
use crate::export::merge::{merged_parts, Part};
use crate::gguf::{calibrated, quants, GgmlType, TensorInfo, Value};
use crate::model::gguf_arch as arch;
use crate::model::peft::PeftAdapter;
use crate::model::{LoadedModel, ModelConfig, MoeLayout, TokenizerInfo};

/// What `kiln export gguf` was asked for.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub preset: Preset,
    /// Overrides the detected `tokenizer.ggml.pre`.
    pub tokenizer_pre: Option<String>,
    /// `general.name`; the output file's stem by default.
    pub name: Option<String>,
    /// Per GGUF weight name, the importance of each input column (an imatrix's mean squares):
    /// weights that have one are quantized under it, as `llama-quantize --imatrix` does.
    pub importance: Option<HashMap<String, Vec<f32>>>,
    /// Per GGUF tensor name, a type that replaces the preset's choice (`--quant auto`).
    pub types: Option<HashMap<String, GgmlType>>,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensor count per storage type.
    pub types: BTreeMap<String, usize>,
    /// Where the file will behave differently from the model in kiln.
    pub warnings: Vec<String>,
}

impl std::fmt::Display for GgufSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<String> = self.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        write!(
            f,
            "wrote {} ({:.1} MiB, {} tensors: {})",
            self.path.display(),
            self.bytes as f64 / (1 << 20) as f64,
            self.tensors,
            types.join(", ")
        )?;
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// The tensor order of convert_hf_to_gguf.py: shard files in name order, tensor names sorted
/// within each. llama-quantize's per-layer choices count tensors in file order, so matching
/// it makes kiln's Q4_K_M pick the same types as llama.cpp's for the same model.
fn convert_order(dir: &Path, mut names: Vec<String>) -> Vec<String> {
    let shard_of: HashMap<String, String> =
        crate::io::read_json(&dir.join("model.safetensors.index.json"))
            .ok()
            .and_then(|j| {
                j.get("weight_map")?.as_object().map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
            })
            .unwrap_or_default();
    let none = String::new();
    names.sort_by(|a, b| {
        let sa = shard_of.get(a).unwrap_or(&none);
        let sb = shard_of.get(b).unwrap_or(&none);
        sa.cmp(sb).then(a.cmp(b))
    });
    names
}

/// `order` with each layer's experts replaced, where convert_hf_to_gguf.py puts them (at the
/// layer's last expert tensor), by three stacks named `model.layers.N.{module}.experts.{w}.weight`
/// (Mixtral's `block_sparse_moe` and w1, w2, w3; Qwen3-MoE's `mlp` and gate, down, up), each
/// listing its experts in order.
fn stack_experts(
    order: Vec<String>,
    n_experts: usize,
    layout: Option<MoeLayout>,
) -> Vec<(String, Vec<String>)> {
    let Some(l) = layout else {
        return order.into_iter().map(|n| (n.clone(), vec![n])).collect();
    };
    let marker = format!(".{}.experts.", l.module);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = vec![];
    for name in order {
        let Some((layer, _)) = name.split_once(&marker) else {
            out.push((name.clone(), vec![name]));
            continue;
        };
        let count = seen.entry(layer.to_string()).or_insert(0);
        *count += 1;
        if *count == 3 * n_experts {
            for w in [l.gate, l.down, l.up] {
                let sources = (0..n_experts)
                    .map(|e| format!("{layer}{marker}{e}.{w}.weight"))
                    .collect();
                out.push((format!("{layer}{marker}{w}.weight"), sources));
            }
        }
    }
    out
}

/// llama.cpp's architecture for `config`, or an error naming what kiln exports.
fn check_arch(config: &ModelConfig, path: &Path) -> Result<&'static str> {
    let renormalizable = config
        .family()
        .experts
        .is_some_and(|e| e.renormalize.is_some());
    if renormalizable && !config.norm_topk_prob {
        return Err(KilnError::model(
            path,
            "norm_topk_prob = false: llama.cpp's qwen3moe always renormalizes the picked experts' weights, so a GGUF file would compute another model",
        ));
    }
    if let (Some(rotates), Some(n)) = (&config.rope_layers, config.family().no_rope_every) {
        if (0..config.num_layers).any(|i| rotates[i] == (i + 1).is_multiple_of(n)) {
            return Err(KilnError::model(
                path,
                format!("no_rope_layers is not \"every {n}th layer without rotation\", the only pattern llama.cpp's `{}` architecture runs, so a GGUF file would compute another model", config.family().gguf_arch),
            ));
        }
    }
    arch::arch_name(&config.model_type).ok_or_else(|| {
        KilnError::model(
            path,
            format!(
                "GGUF export supports {:?} models; this one is `{}`",
                crate::model::family::gguf_arches(),
                config.model_type
            ),
        )
    })
}

fn general_metadata(arch_name: &str, kind: &str, name: &str) -> Vec<(String, Value)> {
    vec![
        (
            keys::general::ARCHITECTURE.into(),
            Value::String(arch_name.into()),
        ),
        (keys::general::TYPE.into(), Value::String(kind.into())),
        (keys::general::NAME.into(), Value::String(name.into())),
    ]
}

fn default_name(out: &Path) -> String {
    out.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// What was written to `out`: its size and the tensor count per storage type.
fn summary(out: &Path, infos: &[TensorInfo]) -> Result<GgufSummary> {
    let bytes = std::fs::metadata(out)
        .map_err(|e| KilnError::io(out, e))?
        .len();
    let mut types = BTreeMap::new();
    for t in infos {
        *types.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
    }
    Ok(GgufSummary {
        path: out.to_path_buf(),
        tensors: infos.len(),
        bytes,
        types,
        warnings: vec![],
    })
}

/// Writes `loaded` (its adapter, if any, merged into the weights it was trained against) as a
/// GGUF file for llama.cpp. `progress` is told after each tensor.
pub fn export_model(
    loaded: &LoadedModel,
    out: &Path,
    opts: &GgufOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<GgufSummary> {
    let cfg = &loaded.model.config;
    let arch_name = check_arch(cfg, &loaded.dir)?;
    let parts: HashMap<String, Part> = merged_parts(&loaded.model).into_iter().collect();
    let rope_tensors = arch::rope_tensors(cfg);
    let (planned, order) = plan_tensors(loaded, &parts)?;
    let types: Vec<GgmlType> = choose_types(opts.preset, &planned, cfg)
        .into_iter()
        .zip(&planned)
        .map(|(ty, (name, _))| {
            opts.types
                .as_ref()
                .and_then(|t| t.get(name).copied())
                .unwrap_or(ty)
        })
        .collect();
    let infos: Vec<TensorInfo> = planned
        .iter()
        .zip(&types)
        .map(|((name, dims), &ty)| TensorInfo {
            name: name.clone(),
            dims: dims.clone(),
            ggml_type: ty,
        })
        .collect();

    let mut name = opts.name.clone().unwrap_or_else(|| default_name(out));
    let mut warnings = vec![];
    // llama.cpp applies Phi-3's tokenizer rules (whitespace stripped after special tokens) to a
    // phi3 model whose general.name contains "phi3"/"phi-3", and then needs `</s>`, `<unk>`, `<s>`
    // and `<|endoftext|>` in the vocabulary (llama-vocab.cpp): name the file to match the vocab.
    if arch_name == "phi3" {
        let lower = name.to_lowercase();
        let named = lower.contains("phi3") || lower.contains("phi-3");
        let spm_phi3 = ["</s>", "<unk>", "<s>", "<|endoftext|>"]
            .iter()
            .all(|t| loaded.tokenizer.tokenizer.token_to_id(t).is_some());
        if spm_phi3 && !named {
            if opts.name.is_some() {
                warnings.push(format!("general.name `{name}` does not contain `phi3`, which llama.cpp needs to tokenize Phi-3 chats right; wrote `phi3-{name}`"));
            }
            name = format!("phi3-{name}");
        } else if !spm_phi3 && named {
            let renamed = name
                .replace("phi-3", "phi")
                .replace("Phi-3", "Phi")
                .replace("phi3", "phi")
                .replace("Phi3", "Phi")
                .replace("PHI3", "PHI");
            warnings.push(format!("general.name `{name}` would make llama.cpp apply Phi-3's SentencePiece token rules to this vocabulary, which lacks their tokens, and fail to load it; wrote `{renamed}`"));
            name = renamed;
        }
    }
    let mut metadata = general_metadata(arch_name, "model", &name);
    metadata.extend(arch::hparams(cfg));
    metadata.push((
        keys::general::FILE_TYPE.into(),
        Value::U32(opts.preset.file_type()),
    ));
    metadata.push((keys::general::QUANTIZATION_VERSION.into(), Value::U32(2)));
    metadata.extend(crate::tokenizer::vocab::export_metadata(
        &loaded.dir,
        &loaded.tokenizer,
        cfg.vocab_size,
        opts.tokenizer_pre.as_deref(),
    )?);
    crate::tokenizer::vocab::check_export(out, &loaded.tokenizer, &metadata)?;

    let offset = rope_tensors.len();
    let total = infos.len();
    crate::gguf::write(out, &metadata, &infos, |i| {
        let info = &infos[i];
        let values = if i < offset {
            rope_tensors[i].1.clone()
        } else {
            let (hf, sources) = &order[i - offset];
            let mut values = vec![];
            let mut shape = vec![];
            for source in sources {
                let t = parts[source].to_f32()?;
                shape = t.dims().to_vec();
                values.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
            match arch::permute_heads(cfg, hf) {
                Some(n_head) => {
                    let cols = if shape.len() == 2 { shape[1] } else { 1 };
                    arch::permute_rows(&values, n_head, cols)
                }
                // llama.cpp's Gemma norms multiply by the stored weight: store 1 + w.
                None if cfg.family().gemma_norms && hf.ends_with("norm.weight") => {
                    values.iter().map(|v| v + 1.0).collect()
                }
                None => values,
            }
        };
        let importance = opts
            .importance
            .as_ref()
            .and_then(|m| m.get(&info.name))
            .filter(|w| {
                calibrated::uses_importance(info.ggml_type) && w.len() as u64 == info.dims[0]
            });
        let bytes = match importance {
            Some(w) => calibrated::quantize_with_importance(info.ggml_type, &values, w)?,
            None => quants::quantize(info.ggml_type, &values)?,
        };
        progress(i + 1, total);
        Ok(bytes)
    })?;
    let mut summary = summary(out, &infos)?;
    summary.warnings = warnings;
    if cfg.sandwich_norms() && (cfg.attn_scale * (cfg.head_dim as f64).sqrt() - 1.0).abs() > 1e-6 {
        summary.warnings.push(format!(
            "query_pre_attn_scalar differs from head_dim {}: llama.cpp scales Gemma 2 and 3 attention by 1/√head_dim (1/√(hidden/heads) for 27B), so the GGUF computes differently",
            cfg.head_dim
        ));
    }
    // llama.cpp runs neither `llama` (Mistral) nor `phi3` with a window ("Phi SWA is currently
    // disabled", src/models/phi3.cpp); its gemma2 has it.
    let window_ignored = !cfg.family().gguf_window;
    if let Some(w) = cfg
        .sliding_window
        .filter(|&w| window_ignored && w < cfg.max_position_embeddings)
    {
        summary.warnings.push(format!(
            "the model attends to a sliding window of {w} tokens, which llama.cpp's `{arch_name}` architecture does not apply: the GGUF matches the model on contexts up to {w} tokens and attends to all tokens beyond"
        ));
    }
    Ok(summary)
}

/// The tensors an export writes, in file order, as (GGUF name, GGUF dims) — RoPE factor tensors
/// first — and each model tensor's sources (one HF tensor, or (Mixtral) every expert's,
/// stacked).
type Planned = (Vec<(String, Vec<u64>)>, Vec<(String, Vec<String>)>);

fn plan_tensors(loaded: &LoadedModel, parts: &HashMap<String, Part>) -> Result<Planned> {
    let cfg = &loaded.model.config;
    let arch_name = check_arch(cfg, &loaded.dir)?;
    let mut order = convert_order(&loaded.dir, parts.keys().cloned().collect());
    if cfg.family().gemma_norms {
        // llama.cpp's gemma, gemma2 and gemma3 always use the embeddings as the output head.
        order.retain(|n| n != "lm_head.weight");
    }
    let mut planned: Vec<(String, Vec<u64>)> = vec![];
    for (name, f) in &arch::rope_tensors(cfg) {
        planned.push((name.clone(), vec![f.len() as u64]));
    }
    let order = stack_experts(order, cfg.num_experts, cfg.moe_layout());
    for (hf, sources) in &order {
        let g = arch::gguf_name(hf, arch_name).ok_or_else(|| {
            KilnError::model(&loaded.dir, format!("no GGUF name for tensor `{hf}`"))
        })?;
        let mut dims: Vec<u64> = parts[&sources[0]]
            .shape()
            .iter()
            .rev()
            .map(|&d| d as u64)
            .collect();
        if sources.len() > 1 {
            dims.push(sources.len() as u64);
        }
        planned.push((g, dims));
    }
    Ok((planned, order))
}

/// One tensor of an export: its GGUF name, dims, and the Hugging Face name where it has one.
pub type PlannedTensor = (String, Vec<u64>, Option<String>);

/// The tensors `export_model` would write (GGUF names and dims, file order), with the model's
/// Hugging Face name of each where it has one tensor, and the architecture's GGUF name.
pub fn planned_tensors(loaded: &LoadedModel) -> Result<(Vec<PlannedTensor>, &'static str)> {
    let parts: HashMap<String, Part> = merged_parts(&loaded.model).into_iter().collect();
    let (planned, order) = plan_tensors(loaded, &parts)?;
    let offset = planned.len() - order.len();
    let out = planned
        .into_iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let hf = i
                .checked_sub(offset)
                .and_then(|j| (order[j].1.len() == 1).then(|| order[j].0.clone()));
            (name, dims, hf)
        })
        .collect();
    Ok((out, check_arch(&loaded.model.config, &loaded.dir)?))
}

/// The storage type llama.cpp's LoRA converter uses for `--outtype`.
pub fn adapter_type(name: &str) -> Result<GgmlType> {
    Ok(match name {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "bf16" => GgmlType::BF16,
        "q8_0" => GgmlType::Q8_0,
        other => {
            return Err(KilnError::Usage(format!(
                "--outtype {other}: an adapter is written as f32, f16, bf16 or q8_0"
            )))
        }
    })
}

/// Writes a PEFT adapter as a llama.cpp LoRA adapter (formats.md D): `.lora_a` `[r, in]` and
/// `.lora_b` `[out, r]` per adapted tensor, lora_b rows permuted for q/k as the base's rows are,
/// and `adapter.lora.alpha` such that llama.cpp's `alpha / r` is the adapter's scaling (rsLoRA
/// included).
pub fn export_adapter(
    adapter: &PeftAdapter,
    base: &ModelConfig,
    out: &Path,
    ty: GgmlType,
    name: Option<&str>,
) -> Result<GgufSummary> {
    let arch_name = check_arch(base, &adapter.dir)?;
    let s = &adapter.settings;
    let alpha = (s.scaling() * s.r as f64) as f32;
    let mut modules: Vec<&String> = adapter.weights.keys().collect();
    modules.sort();
    let mut infos = vec![];
    let mut sources = vec![];
    for module in modules {
        let (a, b) = &adapter.weights[module];
        let hf = format!("{module}.weight");
        let g = arch::gguf_name(&hf, arch_name).ok_or_else(|| {
            KilnError::model(
                &adapter.dir,
                format!("llama.cpp has no tensor for module `{module}`"),
            )
        })?;
        for (suffix, t, is_b) in [("lora_a", a, false), ("lora_b", b, true)] {
            let (rows, cols) = t.dims2()?;
            // Rows a block does not divide stay F16, as llama.cpp's converter keeps them.
            let ggml_type = if cols % ty.block_size() == 0 {
                ty
            } else {
                GgmlType::F16
            };
            infos.push(TensorInfo::from_torch_shape(
                format!("{g}.{suffix}"),
                &[rows, cols],
                ggml_type,
            ));
            sources.push((
                t.clone(),
                if is_b {
                    arch::permute_heads(base, &hf)
                } else {
                    None
                },
            ));
        }
    }
    let name = name.map(String::from).unwrap_or_else(|| default_name(out));
    let mut metadata = general_metadata(arch_name, "adapter", &name);
    metadata.push((keys::adapter::TYPE.into(), Value::String("lora".into())));
    metadata.push((keys::adapter::LORA_ALPHA.into(), Value::F32(alpha)));
    metadata.push((keys::general::QUANTIZATION_VERSION.into(), Value::U32(2)));
    crate::gguf::write(out, &metadata, &infos, |i| {
        let (t, permute) = &sources[i];
        let (_, cols) = t.dims2()?;
        let values = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let values = match permute {
            Some(n_head) => arch::permute_rows(&values, *n_head, cols),
            None => values,
        };
        quants::quantize(infos[i].ggml_type, &values)
    })?;
    summary(out, &infos)
}

/// Ollama's chat formats kiln recognises, each as a Go template over `.Messages`.
const OLLAMA_TEMPLATES: &[(&str, &str, &str)] = &[
    (
        "llama3",
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "chatml",
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    (
        "phi3",
        "<|user|>",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    ),
    (
        "gemma",
        "<start_of_turn>",
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ),
    // Mistral's current templates (v0.3, Nemo: `[INST]` right before the text) put the system
    // prompt in the last user turn; the older ones (v0.1/v0.2: `[INST] `, a space) in the first.
    (
        "mistral-v3",
        "[INST]Hi",
        "{{- range $i, $_ := .Messages }}{{ if eq .Role \"user\" }}[INST]{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
    ),
    (
        "mistral",
        "[INST]",
        "{{- range $i, $_ := .Messages }}{{ if eq .Role \"user\" }}[INST] {{ if and (eq $i 0) $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
    ),
];

/// The chat format of the model's template, found by rendering a conversation with it: its
/// name, its Go template, and the system prompt the template writes when a conversation has
/// none (Qwen 2.5's "You are Qwen, created by Alibaba Cloud. ..."), which Ollama applies from the
/// Modelfile's SYSTEM.
fn chat_format(tok: &TokenizerInfo) -> Option<(&'static str, &'static str, Option<String>)> {
    let (source, origin) = tok.chat_template.as_ref()?;
    let template = crate::data::template::ChatTemplate::compile(source, origin).ok()?;
    let render = |messages: &[serde_json::Value]| {
        template
            .render(messages, None, true, &tok.special_tokens)
            .ok()
    };
    let user = serde_json::json!({"role": "user", "content": "Hi"});
    let text = render(std::slice::from_ref(&user))?;
    let (name, go) = OLLAMA_TEMPLATES
        .iter()
        .find(|(_, marker, _)| text.contains(marker))
        .map(|(name, _, go)| (*name, *go))?;
    // The same conversation with a marker as its system message: where the marker stands, the
    // conversation without one has the template's default, if it has one.
    const MARKER: &str = "\u{1}kiln-system\u{1}";
    // (Templates that refuse a system role, as Gemma's, have no default either.)
    let with_system = render(&[
        serde_json::json!({"role": "system", "content": MARKER}),
        user,
    ]);
    let default = with_system.as_ref().and_then(|w| {
        let (before, after) = w.split_once(MARKER)?;
        let middle = text.strip_prefix(before)?.strip_suffix(after)?;
        (!middle.is_empty()).then(|| middle.to_string())
    });
    Some((name, go, default))
}

/// An Ollama Modelfile for `gguf_file` (a path relative to the Modelfile's directory works):
/// the chat template as Ollama's Go template, a stop parameter for every end-of-turn token.
pub fn modelfile(
    gguf_file: &str,
    tok: &TokenizerInfo,
    stop_ids: &[u32],
    context_length: usize,
) -> String {
    let mut out =
        format!("# Made by kiln. Run: ollama create NAME -f Modelfile\nFROM {gguf_file}\n");
    match chat_format(tok) {
        Some((name, go, default_system)) => {
            out.push_str(&format!("\n# chat format: {name}\nTEMPLATE \"\"\"{go}\"\"\"\n"));
            if let Some(system) = default_system {
                // Ollama puts it first when a conversation brings no system message, as the
                // model's own template does.
                out.push_str(&format!(
                    "# the chat template's default system prompt\nSYSTEM \"\"\"{system}\"\"\"\n"
                ));
            }
        }
        None => out.push_str(
            "\n# kiln did not recognise the chat format; Ollama falls back to the GGUF's tokenizer.chat_template.\n",
        ),
    }
    out.push('\n');
    let mut stops: Vec<String> = stop_ids
        .iter()
        .filter_map(|&id| tok.tokenizer.id_to_token(id))
        .collect();
    stops.dedup();
    for s in stops {
        out.push_str(&format!(
            "PARAMETER stop {}\n",
            serde_json::to_string(&s).expect("string")
        ));
    }
    out.push_str(&format!(
        "PARAMETER num_ctx {}\nPARAMETER temperature 0.7\nPARAMETER top_p 0.9\n",
        context_length.min(8192)
    ));
    out
}

/// Mean KL (nats per token) from the trained model above which an export warns: a 135M model at
/// Q4_K_M measured 0.07-0.09 with 8-17% more perplexity; Q6_K and Q8_0 stay under 0.01.
pub const FIDELITY_WARN_KL: f64 = 0.02;

/// What to say about a fidelity report: a warning naming closer types when the export moved the
/// model's predictions by more than [`FIDELITY_WARN_KL`].
pub fn fidelity_advice(report: &crate::export::merge::MergeReport, preset: &str) -> Option<String> {
    if report.mean_kl <= FIDELITY_WARN_KL {
        return None;
    }
    let moved = format!(
        "warning: the {preset} file moves the model's predictions by a mean KL of {:.3} nats per token (perplexity {:+.1}%)",
        report.mean_kl,
        100.0 * (report.merged_perplexity / report.trained_perplexity - 1.0)
    );
    // A float file loses nothing itself: the weights differ from those the model was trained
    // with (an adapter trained on an NF4 base, merged into the original weights).
    Some(match matches!(preset, "F32" | "F16" | "BF16") {
        true => format!("{moved}: its weights are not those the adapter was trained on; --into nf4 merges into the NF4 base as trained"),
        false => format!("{moved}; --quant q6_k or q8_0 keeps it closer (mean KL under 0.01 on the models measured)"),
    })
}

/// An Ollama Modelfile for a LoRA adapter on its base (`FROM base`, `ADAPTER ./adapter.gguf`).
pub fn adapter_modelfile(base_gguf: &str, adapter_file: &str) -> String {
    format!(
        "# Made by kiln. Run: ollama create NAME -f Modelfile\n# The base must be the model the adapter was trained on.\nFROM {base_gguf}\nADAPTER {adapter_file}\n"
    )
}

/// How far the GGUF file, read back by kiln (dequantized, f32 on the CPU), is from the trained
/// model (`adapter` on its NF4 `base`, or `base` itself) on the first `rows` examples of `data`
/// (its validation rows when it sets some aside).
pub fn fidelity(
    base: &str,
    adapter: Option<&Path>,
    gguf_file: &Path,
    data: &crate::recipe::DataSection,
    rows: usize,
) -> Result<crate::export::merge::MergeReport> {
    use crate::infer::{self, InferenceOptions};
    let opts = |quantize| InferenceOptions {
        device: "cpu".into(),
        dtype: Some(candle_core::DType::F32),
        quantize,
        ..Default::default()
    };
    let trained = infer::load(base, adapter, &opts(None))?;
    // A run's validation rows when its data section sets some aside; the rows given otherwise.
    let dataset = crate::data::load_dataset(data, &trained.tokenizer, 0)?;
    let mut examples = match dataset.val.is_empty() {
        true => dataset.train,
        false => dataset.val,
    };
    examples.truncate(rows);
    let exported = infer::load(&gguf_file.to_string_lossy(), None, &opts(Some(false)))?;
    let mut report = crate::export::merge::compare(&trained.model, &exported.model, &examples)?;
    report.reference = if adapter.is_some() {
        "trained (adapter on NF4 base)".into()
    } else {
        "source model".into()
    };
    report.candidate = "GGUF".into();
    Ok(report)
}

/// The model `kiln export gguf` writes: `model` with `adapter` merged in (`into` the NF4 weights
/// it was trained against or the original ones), or `model` alone in its stored dtype; on the CPU.
pub fn load_for_export(
    model: &str,
    adapter: Option<&Path>,
    into: crate::export::merge::MergeInto,
) -> Result<LoadedModel> {
    match adapter {
        Some(adapter) => crate::export::merge::load_for_merge(model, adapter, into, "cpu"),
        None => {
            let dir = crate::model::source::resolve_model_path(model)?;
            let cfg = crate::model::load_config(&dir)?;
            crate::infer::load(
                model,
                None,
                &crate::infer::InferenceOptions {
                    device: "cpu".into(),
                    dtype: Some(cfg.stored_dtype().unwrap_or(candle_core::DType::F32)),
                    quantize: Some(false),
                    ..Default::default()
                },
            )
        }
    }
}

/// Writes the Ollama Modelfile of `loaded`, exported as `output`, beside it; returns its path.
pub fn write_modelfile_beside(loaded: &LoadedModel, output: &Path) -> Result<std::path::PathBuf> {
    let stops = crate::infer::generate::stop_tokens(&loaded.tokenizer, &loaded.model, &loaded.dir);
    let name = output
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = modelfile(
        &format!("./{name}"),
        &loaded.tokenizer,
        &stops,
        loaded.model.config.max_position_embeddings,
    );
    let path = output.with_file_name("Modelfile");
    crate::io::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

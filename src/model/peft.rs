//! PEFT LoRA adapters (docs/formats.md B): `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` `[r, in]`
//! and `...lora_B.weight` `[out, r]`.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{KilnError, Result};
use crate::io::{replace_dir, write_atomic, write_safetensors, TensorData};
use crate::lora::LoraSettings;
use crate::model::decoder::FrozenWeight;
use crate::model::Decoder;

/// adapter_config.json with only the standard fields, so older PEFT versions load it too.
pub fn adapter_config(settings: &LoraSettings, base_model: &str) -> serde_json::Value {
    // The f32 as the recipe wrote it (0.05, not 0.05000000074505806).
    let dropout: f64 = settings
        .dropout
        .to_string()
        .parse()
        .expect("a float's own text");
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": null,
        "inference_mode": true,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": dropout,
        "target_modules": settings.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "use_rslora": settings.use_rslora,
        "use_dora": false,
        "lora_bias": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// The adapter tensors of `model`, by PEFT key.
pub fn adapter_tensors(model: &Decoder) -> Result<Vec<(String, TensorData)>> {
    let mut out = vec![];
    for (prefix, lora) in model.adapters() {
        out.push((
            format!("{prefix}.lora_A.weight"),
            TensorData::from_tensor(lora.a.as_tensor())?,
        ));
        out.push((
            format!("{prefix}.lora_B.weight"),
            TensorData::from_tensor(lora.b.as_tensor())?,
        ));
    }
    Ok(out)
}

/// Writes the adapter into `dir` atomically: both files go into a temporary directory that
/// then replaces `dir`.
pub fn save_adapter(
    dir: &Path,
    model: &Decoder,
    settings: &LoraSettings,
    base_model: &str,
) -> Result<()> {
    save_adapter_with(dir, model, settings, base_model, |_| Ok(()))
}

/// As [`save_adapter`], with more files written into the directory by `extra` before it
/// replaces `dir` (a training checkpoint's state).
pub fn save_adapter_with(
    dir: &Path,
    model: &Decoder,
    settings: &LoraSettings,
    base_model: &str,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| KilnError::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| KilnError::io(&tmp, e))?;
        let config = adapter_config(settings, base_model);
        write_atomic(
            &tmp.join("adapter_config.json"),
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        )?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(
            &tmp.join("adapter_model.safetensors"),
            &adapter_tensors(model)?,
            Some(meta),
        )?;
        extra(&tmp)?;
        replace_dir(&tmp, dir)
    })();
    if written.is_err() {
        // A full disk or a crash mid-write leaves no half adapter behind.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// A PEFT LoRA adapter read from a directory.
pub struct PeftAdapter {
    pub dir: std::path::PathBuf,
    pub settings: LoraSettings,
    /// `lora_A` / `lora_B` weights by module path (`model.layers.0.self_attn.q_proj`), f32 on the CPU.
    pub weights: HashMap<String, (candle_core::Tensor, candle_core::Tensor)>,
}

fn config_err(path: &Path, msg: impl Into<String>) -> KilnError {
    KilnError::model(path, msg)
}

/// Reads `adapter_config.json` and `adapter_model.safetensors` of a PEFT LoRA adapter.
pub fn read_adapter(dir: &Path) -> Result<PeftAdapter> {
    if !dir.is_dir() {
        return Err(KilnError::model(dir, "adapter directory not found"));
    }
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.exists() {
        return Err(config_err(
            &cfg_path,
            "not found; a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors",
        ));
    }
    let cfg = crate::io::read_json(&cfg_path)?;
    let peft_type = cfg
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(config_err(
            &cfg_path,
            format!("peft_type is {peft_type}; kiln reads LoRA adapters"),
        ));
    }
    for flag in ["use_dora", "use_qalora"] {
        if cfg.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            return Err(config_err(
                &cfg_path,
                format!("{flag} adapters are not supported"),
            ));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if cfg
            .get(pattern)
            .and_then(|v| v.as_object())
            .is_some_and(|o| !o.is_empty())
        {
            return Err(config_err(&cfg_path, format!("per-module `{pattern}` is not supported; every module must share r and lora_alpha")));
        }
    }
    let r = cfg
        .get("r")
        .and_then(|v| v.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| config_err(&cfg_path, "`r` must be a positive integer"))?
        as usize;
    let alpha = cfg
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(8.0);
    let target_modules = match cfg.get("target_modules") {
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(serde_json::Value::String(s)) if s == "all-linear" => crate::recipe::LINEAR_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Some(serde_json::Value::String(s))
            if s.chars().all(|c| c.is_alphanumeric() || c == '_') =>
        {
            vec![s.clone()]
        }
        other => {
            return Err(config_err(
                &cfg_path,
                format!("target_modules {other:?} is not a list of module names"),
            ))
        }
    };
    let settings = LoraSettings {
        r,
        alpha,
        dropout: cfg
            .get("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0) as f32,
        use_rslora: cfg
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        target_modules,
    };
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            "; this adapter is in PyTorch's pickle format (adapter_model.bin): re-save it with safe_serialization=True"
        } else {
            ""
        };
        return Err(config_err(&st_path, format!("not found{hint}")));
    }
    let tensors = candle_core::safetensors::load(&st_path, &candle_core::Device::Cpu)
        .map_err(|e| config_err(&st_path, format!("cannot read: {e}")))?;
    let mut halves: HashMap<String, (Option<candle_core::Tensor>, Option<candle_core::Tensor>)> =
        HashMap::new();
    for (key, t) in tensors {
        let module = key.strip_prefix("base_model.model.").unwrap_or(&key);
        let (module, is_a) = if let Some(m) = module.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(config_err(
                &st_path,
                format!("unexpected tensor `{key}`; kiln reads lora_A / lora_B weights only"),
            ));
        };
        let t = t.to_dtype(candle_core::DType::F32)?;
        let slot = halves.entry(module.to_string()).or_default();
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    let mut weights = HashMap::new();
    for (module, (a, b)) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                weights.insert(module, (a, b));
            }
            _ => {
                return Err(config_err(
                    &st_path,
                    format!("`{module}` has only one of lora_A and lora_B"),
                ))
            }
        }
    }
    Ok(PeftAdapter {
        dir: dir.to_path_buf(),
        settings,
        weights,
    })
}

/// Sets the adapters of `model` (built with `adapter.settings`) to the adapter's weights. Every
/// adapter of the model needs weights of the right shape, and every weight a module.
pub fn apply_adapter(model: &Decoder, adapter: &PeftAdapter) -> Result<()> {
    let file = adapter.dir.join("adapter_model.safetensors");
    let mut used = 0;
    for (prefix, lora) in model.adapters() {
        let module = prefix.strip_prefix("base_model.model.").unwrap_or(&prefix);
        let (a, b) = adapter.weights.get(module).ok_or_else(|| {
            KilnError::model(
                &file,
                format!("no weights for `{module}`, which adapter_config.json targets"),
            )
        })?;
        for (name, want, got) in [
            ("lora_A", lora.a.as_tensor(), a),
            ("lora_B", lora.b.as_tensor(), b),
        ] {
            if want.dims() != got.dims() {
                return Err(KilnError::model(
                    &file,
                    format!(
                        "`{module}.{name}` has shape {:?} but the base model needs {:?} (r = {}): the adapter was trained on another base model or with another rank",
                        got.dims(),
                        want.dims(),
                        adapter.settings.r
                    ),
                ));
            }
        }
        lora.a.set(&a.to_device(lora.a.device())?)?;
        lora.b.set(&b.to_device(lora.b.device())?)?;
        used += 1;
    }
    let known = model
        .adapters()
        .into_iter()
        .map(|(p, _)| p.trim_start_matches("base_model.model.").to_string())
        .collect();
    check_all_used(adapter, used, known)
}

/// Adds `scaling · B·A` of every adapted projection to its dense base weight, in place, so the
/// model computes base + adapter with no adapter work at all: what a speculative draft wants,
/// whose rounding only moves how many proposals stand. `model` must be loaded without adapters,
/// dense, and share no weight with another model (a draft loads its own copy).
pub fn merge_adapter_in_place(model: &Decoder, adapter: &PeftAdapter) -> Result<()> {
    let file = adapter.dir.join("adapter_model.safetensors");
    let scaling = adapter.settings.scaling();
    let (mut used, mut known) = (0, std::collections::HashSet::new());
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, linear) in layer.linears() {
            let module = format!("model.layers.{i}.{name}");
            let weights = adapter.weights.get(&module);
            known.insert(module.clone());
            let Some((a, b)) = weights else {
                continue;
            };
            let FrozenWeight::Dense(w) = &linear.base else {
                return Err(KilnError::model(
                    &file,
                    format!("`{module}`: an adapter merges into a dense base only, and this one is held in NF4"),
                ));
            };
            let (out_f, in_f) = w.dims2()?;
            if a.dims() != [adapter.settings.r, in_f] || b.dims() != [out_f, adapter.settings.r] {
                return Err(KilnError::model(
                    &file,
                    format!(
                        "`{module}` has lora_A {:?} and lora_B {:?} but the base model's projection is [{out_f}, {in_f}] (r = {}): the adapter was trained on another base model or with another rank",
                        a.dims(),
                        b.dims(),
                        adapter.settings.r
                    ),
                ));
            }
            let device = w.device();
            let delta = (b.to_device(device)?.matmul(&a.to_device(device)?)? * scaling)?;
            let merged = (w.to_dtype(candle_core::DType::F32)? + delta)?.to_dtype(w.dtype())?;
            w.slice_set(&merged, 0, 0)?;
            used += 1;
        }
    }
    check_all_used(adapter, used, known)
}

/// Every module the adapter has weights for was used, or the first few that were not, named.
fn check_all_used(
    adapter: &PeftAdapter,
    used: usize,
    known: std::collections::HashSet<String>,
) -> Result<()> {
    if used == adapter.weights.len() {
        return Ok(());
    }
    let mut extra: Vec<&String> = adapter
        .weights
        .keys()
        .filter(|k| !known.contains(*k))
        .collect();
    extra.sort();
    Err(KilnError::model(
        adapter.dir.join("adapter_model.safetensors"),
        format!(
            "weights for modules the base model does not have or the config does not target: {}",
            extra
                .iter()
                .take(4)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Checks an adapter against a base model's config without loading the base: every module
/// exists in the architecture and its lora_A/lora_B shapes fit the projection.
pub fn check_adapter_shapes(
    adapter: &PeftAdapter,
    config: &crate::model::ModelConfig,
) -> Result<()> {
    let file = adapter.dir.join("adapter_model.safetensors");
    let linears = config.layer_linears();
    for (module, (a, b)) in &adapter.weights {
        let parsed = module
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(layer, path)| Some((layer.parse::<usize>().ok()?, path)));
        let fits = parsed.and_then(|(layer, path)| {
            let (_, _, out_f, in_f) = linears
                .iter()
                .find(|(group, name, _, _)| format!("{group}.{name}") == path)?;
            Some(
                layer < config.num_layers
                    && a.dims() == [adapter.settings.r, *in_f]
                    && b.dims() == [*out_f, adapter.settings.r],
            )
        });
        match fits {
            Some(true) => {}
            Some(false) => {
                return Err(KilnError::model(
                    &file,
                    format!(
                        "`{module}`: lora_A {:?} / lora_B {:?} do not fit this base model (r = {}): the adapter was trained on another base model or with another rank",
                        a.dims(),
                        b.dims(),
                        adapter.settings.r
                    ),
                ))
            }
            None => {
                return Err(KilnError::model(
                    &file,
                    format!("module `{module}` does not exist in the base model"),
                ))
            }
        }
    }
    Ok(())
}

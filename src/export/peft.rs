//! PEFT LoRA adapters (shared/specs/formats.md B): `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` `[r, in]`
//! and `...lora_B.weight` `[out, r]`.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{KilnError, Result};
use crate::io::{replace_dir, write_atomic, write_safetensors, TensorData};
use crate::lora::LoraSettings;
use crate::model::Llama;

/// adapter_config.json with only the standard fields, so older PEFT versions load it too.
pub fn adapter_config(settings: &LoraSettings, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": null,
        "inference_mode": true,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
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
pub fn adapter_tensors(model: &Llama) -> Result<Vec<(String, TensorData)>> {
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
    model: &Llama,
    settings: &LoraSettings,
    base_model: &str,
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
    replace_dir(&tmp, dir)
}

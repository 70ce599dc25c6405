//! Where a model comes from, as a user names it: `tiny:ARCH` (a small random model made on first
//! use), a Hugging Face model directory, or a GGUF file. Every command resolves its `--model`
//! (and a recipe its `model.path`) here.

use std::path::PathBuf;

use crate::error::{KilnError, Result};

/// Resolves `tiny:ARCH` (made on first use, seed 0) or returns a plain path as is. A regular
/// file must be a GGUF file: anything else is named as neither.
pub fn resolve_model_path(spec: &str) -> Result<PathBuf> {
    let Some(arch) = spec.strip_prefix("tiny:") else {
        let path = PathBuf::from(spec);
        if path.is_file() && !crate::gguf::is_gguf(&path) {
            return Err(KilnError::model(
                &path,
                "this file is neither a GGUF file (it lacks the GGUF magic) nor a model directory; give a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file",
            ));
        }
        return Ok(path);
    };
    let dir = super::tiny::cache_dir().join(format!("tiny-{arch}-seed0"));
    if dir.join("config.json").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    // Build beside the final place and rename, so a crash never leaves half a model.
    let tmp =
        super::tiny::cache_dir().join(format!(".tiny-{arch}-seed0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    super::tiny::init_tiny(arch, &tmp, 0)?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process made it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}

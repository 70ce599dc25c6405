//! Training checkpoints that resume exactly: the PEFT adapter plus everything the loop needs to
//! go on as if it had never stopped (optimizer moments and step, data cursor, dropout RNG,
//! best eval loss), and the identity of the recipe and base model they belong to. A checkpoint
//! directory is written whole under a temporary name and renamed, so a crash (even SIGKILL
//! mid-save) leaves either the previous checkpoint or the new one, never half of one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::batch::Cursor;
use crate::error::{KilnError, Result};
use crate::rng::KilnRng;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The loop's state after `step` optimizer steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub optimizer_step: usize,
    pub cursor: Cursor,
    pub dropout_rng: KilnRng,
    pub best_eval: Option<f64>,
    /// FNV-1a of the recipe (with `training.resume` cleared) and of the base model's files.
    pub recipe_hash: String,
    pub base_identity: String,
}

/// FNV-1a 64 of `bytes`, as hex.
pub fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The recipe's identity: everything but the resume switches and the output directory (a run's
/// directory may be moved or copied and resumed there).
///
/// A run of `ranks` processes hashes as one process with `ranks` times the accumulation: a
/// checkpoint resumes on another number of GPUs when the step's batch (micro-batch ×
/// accumulation × ranks) stays the same.
pub fn recipe_hash(recipe: &crate::recipe::Recipe, ranks: usize) -> String {
    let mut r = recipe.clone();
    r.training.resume = false;
    r.training.force_resume = false;
    r.output.dir = Default::default();
    r.training.gradient_accumulation_steps *= ranks;
    r.training.gpus = 1;
    // What a run writes for people to read does not change what it trains.
    r.logging = Default::default();
    fnv1a(toml::to_string(&r).unwrap_or_default().as_bytes())
}

/// The base model's identity: config.json's bytes and the names and sizes of its weight files
/// (a GGUF base: the file's name and size).
pub fn base_identity(dir: &Path) -> Result<String> {
    if dir.is_file() {
        let len = std::fs::metadata(dir)
            .map_err(|e| KilnError::io(dir, e))?
            .len();
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        return Ok(fnv1a(format!("{name}:{len}").as_bytes()));
    }
    let mut text = std::fs::read(dir.join("config.json")).unwrap_or_default();
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map_err(|e| KilnError::io(dir, e))?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            (name.ends_with(".safetensors") || name.ends_with(".gguf"))
                .then(|| Some((name, e.metadata().ok()?.len())))?
        })
        .collect();
    files.sort();
    for (name, len) in files {
        text.extend(format!("\n{name}:{len}").bytes());
    }
    Ok(fnv1a(&text))
}

/// The optimizer moments as named tensors (`m.i`, `v.i`).
pub fn optimizer_tensors(
    first: &[Tensor],
    second: &[Tensor],
) -> Result<Vec<(String, crate::io::TensorData)>> {
    let mut out = vec![];
    for (prefix, moments) in [("m", first), ("v", second)] {
        for (i, t) in moments.iter().enumerate() {
            out.push((
                format!("{prefix}.{i}"),
                crate::io::TensorData::from_tensor(t)?,
            ));
        }
    }
    Ok(out)
}

/// Writes the state files of a checkpoint into `dir` (the checkpoint's temporary directory).
pub fn write_state(
    dir: &Path,
    state: &TrainerState,
    first: &[Tensor],
    second: &[Tensor],
) -> Result<()> {
    crate::io::write_safetensors(
        &dir.join(OPTIMIZER_FILE),
        &optimizer_tensors(first, second)?,
        None,
    )?;
    crate::io::write_atomic(
        &dir.join(STATE_FILE),
        serde_json::to_string_pretty(state)
            .expect("state serializes")
            .as_bytes(),
    )
}

/// The `checkpoint-N` directories of `out_dir` by step, oldest first.
fn list(out_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return vec![];
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let n = path
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, path))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint (`checkpoint-N` with its state file) in `out_dir`.
pub fn latest(out_dir: &Path) -> Option<(usize, PathBuf)> {
    list(out_dir)
        .into_iter()
        .rev()
        .find(|(_, path)| path.join(STATE_FILE).exists())
}

/// Removes the oldest checkpoints of `out_dir` beyond the newest `keep` (0: keep all). Called
/// after a new checkpoint is complete, so one always survives.
pub fn prune(out_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let found = list(out_dir);
    let excess = found.len().saturating_sub(keep);
    for (_, path) in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|e| KilnError::io(&path, e))?;
    }
    Ok(())
}

/// Removes what a crash mid-save left behind: `.checkpoint-N.tmp-PID` directories.
pub fn remove_partial(out_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A checkpoint read back: its state, and the optimizer moments on `device`.
pub struct Resumed {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub first_moments: Vec<Tensor>,
    pub second_moments: Vec<Tensor>,
}

/// Reads checkpoint `dir` for `n_params` parameters.
pub fn read(dir: &Path, n_params: usize, device: &Device) -> Result<Resumed> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| KilnError::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| KilnError::model(&state_path, format!("not a kiln trainer state: {e}")))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&opt_path, device)
        .map_err(|e| KilnError::model(&opt_path, format!("cannot read optimizer state: {e}")))?;
    let take = |prefix: &str| -> Result<Vec<Tensor>> {
        (0..n_params)
            .map(|i| {
                tensors.get(&format!("{prefix}.{i}")).cloned().ok_or_else(|| {
                    KilnError::model(
                        &opt_path,
                        format!("`{prefix}.{i}` is missing: the checkpoint has another number of adapter tensors"),
                    )
                })
            })
            .collect()
    };
    Ok(Resumed {
        dir: dir.to_path_buf(),
        first_moments: take("m")?,
        second_moments: take("v")?,
        state,
    })
}

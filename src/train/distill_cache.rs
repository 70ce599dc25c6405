//! `kiln distill cache RECIPE`: the teacher's top-k log-probabilities for every target token of
//! the training data, written once, so that a teacher too big to sit beside the student teaches
//! it anyway (`distill.cache = DIR`).
//!
//! The directory holds safetensors shards — for training sequence `s`, `{s}.ids` (u32) and
//! `{s}.log_probs` (f32), `[targets of s, k]`, the k most likely ids at temperature 1 and their
//! log-probabilities, in the order of the sequence's target tokens — and `cache.json`, written
//! last (a cache without it is incomplete and refused): k, the teacher's vocabulary, and a hash
//! of the token ids and loss masks it was computed for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::TrainData;
use crate::error::{KilnError, Result};
use crate::ops::distill::TeacherRows;

const INFO_FILE: &str = "cache.json";

/// Bytes of cached values a shard holds before the next one starts.
const SHARD_BYTES: usize = 256 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct CacheInfo {
    teacher: String,
    top_k: usize,
    vocab: usize,
    sequences: usize,
    targets: usize,
    data_fingerprint: String,
    shards: Vec<String>,
}

/// A written cache, read a micro-batch at a time (memory-mapped).
pub struct TopKCache {
    dir: PathBuf,
    info: CacheInfo,
    tensors: candle_core::safetensors::MmapedSafetensors,
}

impl TopKCache {
    /// Opens `dir` for training on `data`, refusing a cache of other data or an unfinished one.
    pub fn open(dir: &Path, data: &TrainData, student_vocab: usize) -> Result<Self> {
        let info_path = dir.join(INFO_FILE);
        let text = std::fs::read_to_string(&info_path).map_err(|e| {
            KilnError::Recipe(format!(
                "distill.cache {}: no finished cache there ({e}); write it with `kiln distill cache RECIPE`",
                dir.display()
            ))
        })?;
        let info: CacheInfo = serde_json::from_str(&text)
            .map_err(|e| KilnError::Recipe(format!("{}: {e}", info_path.display())))?;
        let fingerprint = format!("{:016x}", data.fingerprint());
        if info.data_fingerprint != fingerprint || info.sequences != data.sequences.len() {
            return Err(KilnError::Recipe(format!(
                "distill.cache {}: written for other training data ({} sequences, data hash {}; this recipe's data has {}, hash {fingerprint}); the [data] section, tokenizer and max_seq_len must be those the cache was written with — run `kiln distill cache` again",
                dir.display(),
                info.sequences,
                info.data_fingerprint,
                data.sequences.len()
            )));
        }
        if info.vocab.min(student_vocab) < info.top_k.min(info.vocab) {
            return Err(KilnError::Recipe(format!(
                "distill.cache {}: the teacher's vocabulary ({}) and the student's ({student_vocab}) share fewer ids than the cache keeps",
                dir.display(),
                info.vocab
            )));
        }
        let shards: Vec<PathBuf> = info.shards.iter().map(|s| dir.join(s)).collect();
        // SAFETY: the shards are only read; kiln writes them once, before cache.json.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&shards)? };
        Ok(Self {
            dir: dir.to_path_buf(),
            info,
            tensors,
        })
    }

    /// Micro-batch `sequences` as [`TeacherRows::TopK`] on `device`: one row per position of
    /// the padded batch, each target's k ids and log-probabilities (other rows carry no loss
    /// and hold zeros).
    pub fn rows(
        &self,
        data: &TrainData,
        sequences: &[usize],
        pad_id: u32,
        device: &Device,
    ) -> Result<TeacherRows<'static>> {
        let batch = data.batch(sequences, pad_id, &Device::Cpu)?;
        let weights = batch.weights.to_vec2::<f32>()?;
        let k = self.info.top_k.min(self.info.vocab);
        let t = weights.first().map_or(0, |w| w.len());
        let mut ids = vec![0u32; sequences.len() * t * k];
        let mut log_probs = vec![0f32; sequences.len() * t * k];
        for (b, &s) in sequences.iter().enumerate() {
            let load = |what: &str| -> Result<Tensor> {
                self.tensors
                    .load(&format!("{s}.{what}"), &Device::Cpu)
                    .map_err(|e| {
                        KilnError::Recipe(format!(
                            "distill.cache {}: sequence {s}: {e}",
                            self.dir.display()
                        ))
                    })
            };
            let (seq_ids, seq_lp) = (
                load("ids")?.flatten_all()?.to_vec1::<u32>()?,
                load("log_probs")?.flatten_all()?.to_vec1::<f32>()?,
            );
            let targets = (0..t).filter(|&j| weights[b][j] != 0.0);
            for (n, j) in targets.enumerate() {
                let (from, to) = (n * k, (b * t + j) * k);
                if from + k > seq_ids.len() {
                    return Err(KilnError::Recipe(format!(
                        "distill.cache {}: sequence {s} has fewer cached targets than the data; write the cache again",
                        self.dir.display()
                    )));
                }
                ids[to..to + k].copy_from_slice(&seq_ids[from..from + k]);
                log_probs[to..to + k].copy_from_slice(&seq_lp[from..from + k]);
            }
        }
        let rows = sequences.len() * t;
        Ok(TeacherRows::TopK {
            ids: Tensor::from_vec(ids, (rows, k), &Device::Cpu)?.to_device(device)?,
            log_probs: Tensor::from_vec(log_probs, (rows, k), &Device::Cpu)?.to_device(device)?,
            vocab: self.info.vocab,
        })
    }
}

/// What [`write`] keeps and how it reads the data.
pub struct CacheSettings<'a> {
    /// The teacher as the recipe names it (recorded in cache.json).
    pub teacher_name: &'a str,
    /// Log-probabilities kept per target token.
    pub top_k: usize,
    /// Sequences the teacher runs at once.
    pub micro_batch: usize,
    pub pad_id: u32,
}

/// Writes the cache of `teacher`'s top-k log-probabilities for every target of `data` into
/// `dir`; `progress` hears each sequence done.
pub fn write(
    dir: &Path,
    teacher: &super::distill::Teacher,
    data: &TrainData,
    settings: &CacheSettings,
    progress: &dyn Fn(usize),
) -> Result<CacheSummary> {
    let CacheSettings {
        teacher_name,
        top_k,
        micro_batch,
        pad_id,
    } = *settings;
    std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir, e))?;
    // An older cache.json would describe shards about to be replaced.
    let _ = std::fs::remove_file(dir.join(INFO_FILE));
    let mut shard: HashMap<String, Tensor> = HashMap::new();
    let (mut shard_bytes, mut shards, mut targets, mut vocab) = (0usize, vec![], 0usize, 0usize);
    let flush = |shard: &mut HashMap<String, Tensor>, shards: &mut Vec<String>| -> Result<()> {
        if shard.is_empty() {
            return Ok(());
        }
        let name = format!("shard-{:05}.safetensors", shards.len());
        let tmp = dir.join(format!("{name}.partial"));
        candle_core::safetensors::save(shard, &tmp)?;
        std::fs::rename(&tmp, dir.join(&name)).map_err(|e| KilnError::io(&tmp, e))?;
        shards.push(name);
        shard.clear();
        Ok(())
    };
    let all: Vec<usize> = (0..data.sequences.len()).collect();
    for group in all.chunks(micro_batch.max(1)) {
        let rows = teacher.rows(data, group, pad_id, None)?;
        let TeacherRows::Hidden {
            hidden,
            head,
            softcap,
        } = rows
        else {
            return Err(KilnError::Train(
                "distill cache: the teacher must be the model, not another cache".into(),
            ));
        };
        vocab = head.dim(0)?;
        let k = top_k.min(vocab);
        let batch = data.batch(group, pad_id, &Device::Cpu)?;
        let weights = batch.weights.to_vec2::<f32>()?;
        let t = weights.first().map_or(0, |w| w.len());
        for (b, &s) in group.iter().enumerate() {
            let positions: Vec<u32> = (0..t)
                .filter(|&j| weights[b][j] != 0.0)
                .map(|j| (b * t + j) as u32)
                .collect();
            let n = positions.len();
            let (ids, lp) = if n == 0 {
                (vec![], vec![])
            } else {
                let idx = Tensor::new(positions.as_slice(), hidden.device())?;
                top_k_log_probs(&hidden.index_select(&idx, 0)?, head, softcap, k)?
            };
            targets += n;
            shard_bytes += 8 * n * k;
            shard.insert(
                format!("{s}.ids"),
                Tensor::from_vec(ids, (n, k), &Device::Cpu)?,
            );
            shard.insert(
                format!("{s}.log_probs"),
                Tensor::from_vec(lp, (n, k), &Device::Cpu)?,
            );
            progress(1);
        }
        if shard_bytes >= SHARD_BYTES {
            flush(&mut shard, &mut shards)?;
            shard_bytes = 0;
        }
    }
    flush(&mut shard, &mut shards)?;
    let info = CacheInfo {
        teacher: teacher_name.into(),
        top_k,
        vocab,
        sequences: data.sequences.len(),
        targets,
        data_fingerprint: format!("{:016x}", data.fingerprint()),
        shards,
    };
    crate::io::write_atomic(
        &dir.join(INFO_FILE),
        serde_json::to_string_pretty(&info)
            .expect("cache info serializes")
            .as_bytes(),
    )?;
    Ok(CacheSummary {
        sequences: info.sequences,
        targets,
        top_k: top_k.min(vocab),
        bytes: 8 * targets * top_k.min(vocab),
    })
}

/// What `kiln distill cache` wrote.
pub struct CacheSummary {
    pub sequences: usize,
    pub targets: usize,
    pub top_k: usize,
    pub bytes: usize,
}

/// The k largest log-probabilities (temperature 1) of each row of `hidden · headᵀ` and their
/// ids, most likely first; rows a chunk at a time, the selection on the host.
fn top_k_log_probs(
    hidden: &Tensor,
    head: &Tensor,
    softcap: Option<f64>,
    k: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let (n, vocab) = (hidden.dim(0)?, head.dim(0)?);
    let rows_per_chunk = ((1usize << 24) / vocab).max(1);
    let (mut ids, mut lps) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
    for start in (0..n).step_by(rows_per_chunk) {
        let len = rows_per_chunk.min(n - start);
        let mut z = hidden
            .narrow(0, start, len)?
            .matmul(&head.t()?)?
            .to_dtype(DType::F32)?;
        if let Some(cap) = softcap {
            z = ((z / cap)?.tanh()? * cap)?;
        }
        let lp = candle_nn::ops::log_softmax(&z, candle_core::D::Minus1)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let picked: Vec<Vec<(u32, f32)>> = lp
            .par_chunks(vocab)
            .map(|row| {
                let mut order: Vec<u32> = (0..vocab as u32).collect();
                let by_value = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
                if k < vocab {
                    order.select_nth_unstable_by(k - 1, by_value);
                    order.truncate(k);
                }
                order.sort_by(by_value);
                order.into_iter().map(|i| (i, row[i as usize])).collect()
            })
            .collect();
        for row in picked {
            for (i, v) in row {
                ids.push(i);
                lps.push(v);
            }
        }
    }
    Ok((ids, lps))
}

/// `kiln distill cache`: loads the student's tokenizer and data as `kiln train` would, and the
/// teacher; writes the cache to `out`, else `distill.cache`, else `OUTPUT_DIR/teacher-cache`.
pub fn cache_command(
    recipe: &super::Recipe,
    out: Option<PathBuf>,
    quiet: bool,
) -> Result<(PathBuf, CacheSummary)> {
    let section = recipe.distill.as_ref().ok_or_else(|| {
        KilnError::Recipe("kiln distill cache needs a [distill] section naming the teacher".into())
    })?;
    let dir = out
        .or_else(|| section.cache.clone())
        .unwrap_or_else(|| recipe.output.dir.join("teacher-cache"));
    let student = super::load_model(recipe)?;
    let inputs = super::TrainInputs::load(recipe, &student)?;
    let teacher = super::distill::Teacher::load_model(recipe, &student)?;
    let bar = super::progress_bar(inputs.data.sequences.len(), quiet, "sequences");
    let settings = CacheSettings {
        teacher_name: section.teacher.as_deref().unwrap_or(""),
        top_k: section.top_k,
        micro_batch: recipe.training.micro_batch_size,
        pad_id: student.tokenizer.pad_id,
    };
    let summary = write(&dir, &teacher, &inputs.data, &settings, &|n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    Ok((dir, summary))
}

//! From dataset rows to token ids and a loss mask, then to padded micro-batches.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{KilnError, Result};
use crate::model::TokenizerInfo;
use crate::recipe::{DataFormat, DataSection};
use crate::rng::KilnRng;

/// One tokenized training example. `loss_mask[i]` says whether token `i` is a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// Tokens that carry loss (the first token never does: nothing predicts it).
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DatasetStats {
    pub rows: usize,
    pub examples: usize,
    pub tokens: usize,
    pub target_tokens: usize,
    pub truncated: usize,
    /// Rows with no target token left after truncation.
    pub dropped: usize,
    pub longest: usize,
}

/// The Stanford Alpaca prompt.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// A row as (prompt, completion): the prompt is masked unless `train_on_inputs`.
struct Row {
    prompt: String,
    completion: String,
}

fn string_field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
    required: bool,
    needs: &str,
) -> std::result::Result<&'a str, String> {
    match obj.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(serde_json::Value::Null) | None if !required => Ok(""),
        None => Err(format!("row has no `{key}` field ({needs})")),
        Some(other) => Err(format!(
            "field `{key}` must be a string, found {}",
            json_kind(other)
        )),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parse_row(value: &serde_json::Value, cfg: &DataSection) -> std::result::Result<Row, String> {
    let obj = value.as_object().ok_or_else(|| {
        format!(
            "each line must be a JSON object, found {}",
            json_kind(value)
        )
    })?;
    match cfg.format {
        DataFormat::Alpaca => {
            let needs = "format `alpaca` needs `instruction` and `output`, `input` is optional";
            let instruction = string_field(obj, "instruction", true, needs)?;
            let input = string_field(obj, "input", false, needs)?;
            let output = string_field(obj, "output", true, needs)?;
            Ok(Row {
                prompt: alpaca_prompt(instruction, input),
                completion: output.to_string(),
            })
        }
        DataFormat::Text => {
            let needs = format!(
                "format `text` reads `data.text_field` = `{}`",
                cfg.text_field
            );
            let text = string_field(obj, &cfg.text_field, true, &needs)?;
            Ok(Row {
                prompt: String::new(),
                completion: text.to_string(),
            })
        }
    }
}

fn encode(tok: &TokenizerInfo, text: &str, special: bool) -> Result<Vec<u32>> {
    Ok(tok
        .tokenizer
        .encode(text, special)
        .map_err(|e| KilnError::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// Token ids and mask of one row: `[bos] prompt completion eos`, the prompt masked unless
/// `train_on_inputs`.
fn tokenize_row(row: &Row, tok: &TokenizerInfo, train_on_inputs: bool) -> Result<Example> {
    let mut ids = encode(tok, &row.prompt, true)?;
    if ids.is_empty() {
        if let Some(bos) = tok.bos_id {
            ids.push(bos);
        }
    }
    let n_prompt = ids.len();
    ids.extend(encode(tok, &row.completion, false)?);
    ids.push(tok.eos_id);
    let loss_mask = (0..ids.len())
        .map(|i| train_on_inputs || i >= n_prompt)
        .collect();
    Ok(Example {
        input_ids: ids,
        loss_mask,
    })
}

/// Reads the rows of one JSONL file.
fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KilnError::data(path, None, "dataset file not found"),
        _ => KilnError::io(path, e),
    })?;
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            KilnError::data(
                path,
                Some(i + 1),
                format!("not valid JSON ({e}); each line must be one JSON object"),
            )
        })?;
        rows.push((i + 1, v));
    }
    Ok(rows)
}

/// Loads, tokenizes and truncates every row of the recipe's data files.
pub fn load_examples(
    cfg: &DataSection,
    tok: &TokenizerInfo,
) -> Result<(Vec<Example>, DatasetStats)> {
    let files: Vec<PathBuf> = cfg.path.to_vec().into_iter().map(PathBuf::from).collect();
    let mut examples = vec![];
    let mut stats = DatasetStats::default();
    for file in &files {
        for (line, value) in read_jsonl(file)? {
            stats.rows += 1;
            let row = parse_row(&value, cfg).map_err(|m| KilnError::data(file, Some(line), m))?;
            let mut ex = tokenize_row(&row, tok, cfg.train_on_inputs)?;
            stats.longest = stats.longest.max(ex.input_ids.len());
            if ex.input_ids.len() > cfg.max_seq_len {
                stats.truncated += 1;
                ex.input_ids.truncate(cfg.max_seq_len);
                ex.loss_mask.truncate(cfg.max_seq_len);
            }
            if ex.num_targets() == 0 {
                stats.dropped += 1;
                continue;
            }
            stats.tokens += ex.input_ids.len();
            stats.target_tokens += ex.num_targets();
            examples.push(ex);
        }
    }
    if examples.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(KilnError::data(
            names.join(", "),
            None,
            if stats.rows == 0 {
                "the dataset is empty: no rows to train on".to_string()
            } else {
                format!(
                    "none of the {} rows has a target token left (raise data.max_seq_len?)",
                    stats.rows
                )
            },
        ));
    }
    stats.examples = examples.len();
    Ok((examples, stats))
}

/// A padded micro-batch: `inputs` and `targets` `[B, T]` (u32), `weights` `[B, T]` (f32; 1 where
/// the target carries loss).
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    pub num_targets: usize,
    pub num_tokens: usize,
}

/// Right-pads examples to the longest one; the model predicts token t+1 from tokens ..=t.
pub fn make_batch(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let t = examples
        .iter()
        .map(|e| e.input_ids.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1);
    let b = examples.len();
    let mut inputs = vec![pad_id; b * t];
    let mut targets = vec![0u32; b * t];
    let mut weights = vec![0f32; b * t];
    let mut num_targets = 0;
    let mut num_tokens = 0;
    for (i, ex) in examples.iter().enumerate() {
        let n = ex.input_ids.len() - 1;
        num_tokens += ex.input_ids.len();
        for j in 0..n {
            inputs[i * t + j] = ex.input_ids[j];
            targets[i * t + j] = ex.input_ids[j + 1];
            if ex.loss_mask[j + 1] {
                weights[i * t + j] = 1.0;
                num_targets += 1;
            }
        }
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        weights: Tensor::from_vec(weights, (b, t), device)?,
        num_targets,
        num_tokens,
    })
}

/// Where the data stream stands: epoch and position in that epoch's order.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cursor {
    pub epoch: usize,
    pub position: usize,
}

/// Micro-batches over the examples, epoch after epoch, each epoch in an order drawn from the
/// seed (or in file order without shuffling).
pub struct BatchStream {
    order: Vec<usize>,
    n: usize,
    micro_batch_size: usize,
    seed: u64,
    shuffle: bool,
    pub cursor: Cursor,
}

impl BatchStream {
    pub fn new(n: usize, micro_batch_size: usize, seed: u64, shuffle: bool) -> Self {
        let mut s = Self {
            order: vec![],
            n,
            micro_batch_size,
            seed,
            shuffle,
            cursor: Cursor::default(),
        };
        s.order = s.epoch_order(0);
        s
    }

    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n).collect();
        if self.shuffle {
            KilnRng::fork(self.seed, 1000 + epoch as u64).shuffle(&mut order);
        }
        order
    }

    pub fn micro_batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.micro_batch_size)
    }

    /// Indices of the next micro-batch (the last one of an epoch may be smaller).
    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.cursor.position >= self.n {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = self.epoch_order(self.cursor.epoch);
        }
        let end = (self.cursor.position + self.micro_batch_size).min(self.n);
        let idx = self.order[self.cursor.position..end].to_vec();
        self.cursor.position = end;
        idx
    }

    /// Fractional epochs consumed.
    pub fn epoch_progress(&self) -> f64 {
        self.cursor.epoch as f64 + self.cursor.position as f64 / self.n as f64
    }
}

//! Evaluation: mean loss and perplexity over the target tokens (the same templating and masks
//! as training), and exact match of generated final answers (GSM8K's `#### <number>` by default).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use regex::Regex;

use super::generate::SamplingParams;
use crate::data::encode::Encoder;
use crate::data::{self, make_batch, Example};
use crate::error::{KilnError, Result};
use crate::io::TensorData;
use crate::model::decoder::masked_cross_entropy_sum;
use crate::model::{Decoder, TokenizerInfo};
use crate::recipe::DataSection;

#[derive(Debug, Clone, serde::Serialize)]
pub struct LossReport {
    pub examples: usize,
    pub target_tokens: usize,
    pub mean_loss: f64,
    pub perplexity: f64,
}

/// Mean token loss and perplexity of `examples` (no dropout), in micro-batches of `batch_size`.
/// With `dump`, also the logits of every token of every example (`logits.N` `[T, vocab]` f32,
/// `input_ids.N`, and what the loss scores: `targets.N`, `weights.N` `[T - 1]`), one example per
/// forward pass.
pub fn eval_loss(
    model: &Decoder,
    examples: &[Example],
    pad_id: u32,
    batch_size: usize,
    mut dump: Option<&mut Vec<(String, TensorData)>>,
    progress: &dyn Fn(usize),
) -> Result<LossReport> {
    let mut loss_sum = 0f64;
    let mut targets = 0usize;
    // Dumping needs the logits of every token, the last one included: one example per pass,
    // whose first T-1 positions also give the loss.
    let chunk_size = if dump.is_some() { 1 } else { batch_size.max(1) };
    for (i, chunk) in examples.chunks(chunk_size).enumerate() {
        let rows: Vec<Vec<&Example>> = chunk.iter().map(|e| vec![e]).collect();
        let batch = make_batch(&rows, false, pad_id, &model.device)?;
        let sum = match dump.as_deref_mut() {
            Some(out) => {
                let ids = &chunk[0].input_ids;
                let full =
                    model.forward(&Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?)?;
                let ids_i64: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
                // What the loss scores: position j predicts targets.N[j] with weight weights.N[j].
                for (name, t, dtype) in [
                    ("logits", full.squeeze(0)?, DType::F32),
                    (
                        "input_ids",
                        Tensor::new(ids_i64.as_slice(), &model.device)?,
                        DType::I64,
                    ),
                    ("targets", batch.targets.squeeze(0)?, DType::I64),
                    ("weights", batch.weights.squeeze(0)?, DType::F32),
                ] {
                    let cpu = t.to_dtype(dtype)?.to_device(&candle_core::Device::Cpu)?;
                    out.push((format!("{name}.{i}"), TensorData::from_tensor(&cpu)?));
                }
                let logits = full.narrow(1, 0, ids.len() - 1)?;
                masked_cross_entropy_sum(&logits, &batch.targets, &batch.weights)?
            }
            None => model.loss_sum(
                &model.forward_hidden(&batch.inputs, None)?,
                &batch.targets,
                &batch.weights,
            )?,
        };
        loss_sum += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        targets += batch.num_targets;
        progress(chunk.len());
    }
    let mean_loss = loss_sum / targets.max(1) as f64;
    Ok(LossReport {
        examples: examples.len(),
        target_tokens: targets,
        mean_loss,
        perplexity: mean_loss.exp(),
    })
}

/// GSM8K's final-answer pattern: `#### 42`.
pub const GSM8K_ANSWER: &str = r"#### (\-?[0-9\.\,]+)";

/// The answer the pattern's first capture group (or whole match) finds first in `text`.
pub fn extract_answer(text: &str, pattern: &Regex) -> Option<String> {
    let caps = pattern.captures(text)?;
    let m = caps.get(1).or_else(|| caps.get(0))?;
    Some(normalize_answer(m.as_str()))
}

/// The last number in `text` (lm-evaluation-harness' "flexible extract").
pub fn last_number(text: &str) -> Option<String> {
    let re = Regex::new(r"-?[$0-9.,]*[0-9]+").expect("valid regex");
    re.find_iter(text)
        .last()
        .map(|m| normalize_answer(m.as_str()))
}

/// Strips `$`, thousands separators, surrounding space and a trailing period; `3.0` and `3`
/// compare equal.
pub fn normalize_answer(s: &str) -> String {
    let s = s.trim().trim_end_matches('.').replace([',', '$'], "");
    match s.parse::<f64>() {
        Ok(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
        Ok(v) => format!("{v}"),
        Err(_) => s,
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExactMatchItem {
    pub source: String,
    pub reference: Option<String>,
    pub generated: String,
    pub answer: Option<String>,
    pub answer_flexible: Option<String>,
    pub correct: bool,
    pub correct_flexible: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExactMatchReport {
    pub rows: usize,
    /// Answers found by the pattern and equal to the reference's.
    pub accuracy: f64,
    /// The same with the last number of the generation as its answer when the pattern finds none.
    pub accuracy_flexible: f64,
    pub generated_tokens: usize,
    pub tokens_per_s: f64,
    /// With a draft model (speculative decoding): the share of its proposals that stood.
    pub draft_acceptance: Option<f64>,
    pub items: Vec<ExactMatchItem>,
}

/// Generates an answer for each row (greedy unless `params` say otherwise; with `draft`, a
/// small model and its proposals a round, by speculative decoding, to the same answers) and
/// compares its extracted final answer with the reference's.
#[allow(clippy::too_many_arguments)]
pub fn exact_match(
    model: &Decoder,
    draft: Option<(&Decoder, usize)>,
    tok: &TokenizerInfo,
    files: &[std::path::PathBuf],
    cfg: &DataSection,
    pattern: &Regex,
    params: &SamplingParams,
    stop_ids: &[u32],
    limit: Option<usize>,
    progress: &dyn Fn(usize),
) -> Result<ExactMatchReport> {
    let templating = data::resolve_template(cfg, tok)?;
    let encoder = Encoder {
        tokenizer: tok,
        chat_template: templating.template.as_ref(),
        template_plain_rows: templating.plain_rows,
        train_on_inputs: false,
        last_turn_only: false,
        add_bos: cfg.add_bos,
    };
    let mut items = vec![];
    let mut tokens = 0usize;
    let mut decode_s = 0f64;
    let mut drafted = crate::infer::speculative::DraftStats::default();
    'files: for file in files {
        let (format, samples) = data::read_samples(file, cfg)?;
        let conversational = matches!(
            format,
            crate::recipe::DataFormat::Messages | crate::recipe::DataFormat::Sharegpt
        );
        if !conversational && templating.template.is_some() && !templating.plain_rows {
            eprintln!(
                "note: {}: plain prompt rows are generated from as raw text, as training reads them (chat template `{}`); an instruct model may answer nothing: --chat-template model puts each prompt in the model's chat template",
                file.display(),
                cfg.chat_template
            );
        }
        for (place, sample) in samples {
            if limit.is_some_and(|l| items.len() >= l) {
                break 'files;
            }
            let prompt = sample.and_then(|s| encoder.prompt(&s));
            let (prompt_ids, reference) = match prompt {
                Ok(p) => p,
                Err(_) if cfg.skip_bad_rows => continue,
                Err(m) => return Err(place.error(m)),
            };
            let (g, stats) = crate::infer::speculative::generate_with(
                model,
                draft,
                tok,
                &prompt_ids,
                params,
                stop_ids,
                &[],
                &mut |_| {},
            )?;
            if let Some(s) = stats {
                drafted.proposed += s.proposed;
                drafted.accepted += s.accepted;
            }
            tokens += g.tokens.len();
            decode_s += g.decode_s;
            let want = extract_answer(&reference, pattern).or_else(|| last_number(&reference));
            let answer = extract_answer(&g.text, pattern);
            let answer_flexible = answer.clone().or_else(|| last_number(&g.text));
            items.push(ExactMatchItem {
                source: place.describe(),
                correct: want.is_some() && answer == want,
                correct_flexible: want.is_some() && answer_flexible == want,
                reference: want,
                generated: g.text,
                answer,
                answer_flexible,
            });
            progress(1);
        }
    }
    if items.is_empty() {
        return Err(KilnError::data(
            files.first().cloned().unwrap_or_default(),
            None,
            "no rows to evaluate",
        ));
    }
    let n = items.len() as f64;
    Ok(ExactMatchReport {
        rows: items.len(),
        accuracy: items.iter().filter(|i| i.correct).count() as f64 / n,
        accuracy_flexible: items.iter().filter(|i| i.correct_flexible).count() as f64 / n,
        generated_tokens: tokens,
        tokens_per_s: tokens as f64 / decode_s.max(1e-9),
        draft_acceptance: draft.map(|_| drafted.acceptance_rate()),
        items,
    })
}

/// Writes dumped logits as safetensors.
pub fn write_logits(path: &Path, tensors: &[(String, TensorData)]) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::io::write_safetensors(path, tensors, Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_answers_are_extracted_and_normalized() {
        let re = Regex::new(GSM8K_ANSWER).unwrap();
        let reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72";
        assert_eq!(extract_answer(reference, &re).as_deref(), Some("72"));
        assert_eq!(
            extract_answer("so #### 1,000.", &re).as_deref(),
            Some("1000")
        );
        assert_eq!(extract_answer("#### -3.50", &re).as_deref(), Some("-3.5"));
        assert_eq!(extract_answer("#### 5.0", &re).as_deref(), Some("5"));
        assert_eq!(extract_answer("The answer is 72.", &re), None);
        assert_eq!(
            last_number("The answer is $1,234.").as_deref(),
            Some("1234")
        );
        assert_eq!(last_number("3 apples and 4 pears: 7"), Some("7".into()));
        assert_eq!(last_number("no digits"), None);
        // A custom pattern without a group uses the whole match.
        let boxed = Regex::new(r"\\boxed\{[^}]*\}").unwrap();
        assert_eq!(
            extract_answer(r"so \boxed{12}", &boxed).as_deref(),
            Some(r"\boxed{12}")
        );
    }
}

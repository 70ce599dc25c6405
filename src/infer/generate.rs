//! Token-by-token generation with a KV cache: the prompt runs once, then each new token costs
//! one single-token forward pass. Greedy or sampled (temperature, top-k, top-p, repetition
//! penalty, seeded), stopping on end-of-turn / eos tokens, stop strings or a token budget,
//! streaming text as it is decoded.

use std::time::Instant;

use candle_core::Tensor;

use crate::error::Result;
use crate::model::{Decoder, KvCache, TokenizerInfo};
use crate::rng::KilnRng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f64,
    /// transformers' repetition penalty over prompt and generated tokens (1: none).
    pub repetition_penalty: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_new_tokens: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfTurn,
    StopString,
    MaxTokens,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    /// Seconds for the prompt (prefill) and for the new tokens (decode).
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Generation {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens.len() as f64 / self.decode_s.max(1e-9)
    }
}

/// The tokens generation stops at: the tokenizer's eos, config.json / generation_config.json
/// eos ids, and the end-of-turn tokens of the common chat formats that the vocabulary has.
pub fn stop_tokens(tok: &TokenizerInfo, model: &Decoder, model_dir: &std::path::Path) -> Vec<u32> {
    let mut ids = vec![tok.eos_id];
    ids.extend(&model.config.eos_token_ids);
    if let Ok(gen) = crate::io::read_json(&model_dir.join("generation_config.json")) {
        match gen.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|n| n as u32)),
            Some(serde_json::Value::Array(a)) => {
                ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32))
            }
            _ => {}
        }
    }
    for t in [
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
    ] {
        if let Some(id) = tok.tokenizer.token_to_id(t) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The distribution `params` sample the next token from, given `logits` (one row, f32): the
/// candidate tokens, most likely first where an order is needed, with their probabilities
/// (repetition penalty, temperature, top-k, top-p applied; greedy: the first maximum alone).
pub fn distribution(
    logits: &mut [f32],
    history: &[u32],
    params: &SamplingParams,
) -> Vec<(u32, f64)> {
    if params.repetition_penalty != 1.0 {
        let p = params.repetition_penalty as f32;
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
    if params.temperature <= 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return vec![(best as u32, 1.0)];
    }
    let t = params.temperature as f32;
    // Candidates, most likely first. The full vocabulary is only sorted when top-p needs it:
    // top-k selects its k in linear time, plain temperature sampling needs no order at all.
    let by_logit = |&a: &usize, &b: &usize| logits[b].total_cmp(&logits[a]).then(a.cmp(&b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if params.top_k > 0 && params.top_k < order.len() {
        order.select_nth_unstable_by(params.top_k - 1, by_logit);
        order.truncate(params.top_k);
        order.sort_by(by_logit);
    } else if params.top_p < 1.0 {
        order.sort_by(by_logit);
    }
    let max = order
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max)
        / t;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] / t - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= params.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    order.into_iter().map(|i| i as u32).zip(probs).collect()
}

/// A token drawn from `dist` with one uniform draw of `rng`.
pub fn draw(dist: &[(u32, f64)], rng: &mut KilnRng) -> u32 {
    let mut u = rng.unit();
    for &(t, p) in dist {
        if u < p {
            return t;
        }
        u -= p;
    }
    dist[dist.len() - 1].0
}

/// Picks the next token from `logits` (one row, f32) as `params` say.
pub fn sample(
    logits: &mut [f32],
    history: &[u32],
    params: &SamplingParams,
    rng: &mut KilnRng,
) -> u32 {
    let dist = distribution(logits, history, params);
    match params.temperature <= 0.0 {
        true => dist[0].0,
        false => draw(&dist, rng),
    }
}

/// Turns the tokens generation commits into text: it stops at a stop token or a stop string
/// and streams what can no longer become part of one (nor half a character).
pub(crate) struct Emitter<'a> {
    tok: &'a TokenizerInfo,
    stop_ids: &'a [u32],
    stop_strings: &'a [String],
    hold_back: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    emitted: usize,
    on_text: &'a mut dyn FnMut(&str),
}

impl<'a> Emitter<'a> {
    pub fn new(
        tok: &'a TokenizerInfo,
        stop_ids: &'a [u32],
        stop_strings: &'a [String],
        on_text: &'a mut dyn FnMut(&str),
    ) -> Self {
        let hold_back = stop_strings
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Self {
            tok,
            stop_ids,
            stop_strings,
            hold_back,
            tokens: vec![],
            text: String::new(),
            emitted: 0,
            on_text,
        }
    }

    /// Commits `next`; says why generation stops, if it does.
    pub fn push(&mut self, next: u32) -> Result<Option<StopReason>> {
        if self.stop_ids.contains(&next) {
            return Ok(Some(StopReason::EndOfTurn));
        }
        self.tokens.push(next);
        self.text = self.tok.decode(&self.tokens)?;
        if let Some(at) = self
            .stop_strings
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            return Ok(Some(StopReason::StopString));
        }
        if !self.text.ends_with('\u{FFFD}') {
            let mut safe = self.text.len().saturating_sub(self.hold_back);
            while !self.text.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > self.emitted {
                (self.on_text)(&self.text[self.emitted..safe]);
                self.emitted = safe;
            }
        }
        Ok(None)
    }

    /// Streams the rest of the text.
    pub fn finish(&mut self) {
        if self.text.len() > self.emitted {
            (self.on_text)(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
    }
}

/// Continues `prompt` (token ids) until a stop token, a stop string or `max_new_tokens`.
/// `on_text` receives the decoded text as it grows (never a piece of a stop string).
pub fn generate(
    model: &Decoder,
    tok: &TokenizerInfo,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    stop_strings: &[String],
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut rng = KilnRng::fork(params.seed, 7);
    let mut cache = KvCache::new(model.layers.len());
    let mut history = prompt.to_vec();
    let mut out = Emitter::new(tok, stop_ids, stop_strings, on_text);
    let start = Instant::now();
    let input = Tensor::new(prompt, &model.device)?.unsqueeze(0)?;
    let mut logits = model.forward_cached(&input, &mut cache)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut stop_reason = StopReason::MaxTokens;
    while out.tokens.len() < params.max_new_tokens {
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = sample(&mut row, &history, params, &mut rng);
        if let Some(reason) = out.push(next)? {
            stop_reason = reason;
            break;
        }
        history.push(next);
        if out.tokens.len() == params.max_new_tokens {
            break;
        }
        let input = Tensor::new(&[next], &model.device)?.unsqueeze(0)?;
        logits = model.forward_cached(&input, &mut cache)?;
    }
    out.finish();
    Ok(Generation {
        tokens: std::mem::take(&mut out.tokens),
        text: std::mem::take(&mut out.text),
        stop_reason,
        prompt_tokens: prompt.len(),
        prefill_s,
        decode_s: decode_start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_penalty_demotes_seen_tokens() {
        let mut rng = KilnRng::new(0);
        let p = SamplingParams::default();
        assert_eq!(sample(&mut [1.0, 3.0, 3.0, 0.5], &[], &p, &mut rng), 1);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // 3.0 seen -> 1.5, so 2.0 wins.
        assert_eq!(sample(&mut [1.0, 3.0, 2.0], &[1], &p, &mut rng), 2);
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = KilnRng::new(4);
        let n = 4000;
        let ones = (0..n)
            .filter(|_| sample(&mut [0.0, 3f32.ln()], &[], &params, &mut rng) == 1)
            .count();
        // p(1) = 3 / (1 + 3) = 0.75; 4000 draws: standard error ~0.007.
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        // Temperature 0.5 sharpens it: p(1) = 9 / 10.
        let sharp = SamplingParams {
            temperature: 0.5,
            ..Default::default()
        };
        let ones = (0..n)
            .filter(|_| sample(&mut [0.0, 3f32.ln()], &[], &sharp, &mut rng) == 1)
            .count();
        assert!((ones as f64 / n as f64 - 0.9).abs() < 0.03);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice_and_the_seed_repeats_it() {
        let logits = [0.0f32, 5.0, 4.9, 4.8, -3.0];
        let draw = |params: &SamplingParams, seed: u64| {
            let mut rng = KilnRng::new(seed);
            (0..200)
                .map(|_| sample(&mut logits.clone(), &[], params, &mut rng))
                .collect::<Vec<_>>()
        };
        let k2 = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let picks = draw(&k2, 1);
        assert!(picks.iter().all(|&t| t == 1 || t == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
        assert_eq!(picks, draw(&k2, 1));
        assert_ne!(picks, draw(&k2, 2));
        // p(1) ≈ 0.36, p(1)+p(2) ≈ 0.69 < 0.7 -> three tokens kept.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            ..Default::default()
        };
        let picks = draw(&p, 3);
        assert!(picks.iter().all(|&t| (1..=3).contains(&t)));
        assert!(picks.contains(&3));
    }
}

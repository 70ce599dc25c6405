//! Speculative decoding: a small draft model proposes K tokens, the target checks them all in
//! one forward pass over its KV cache, and both caches roll back past the first rejected one.
//!
//! - Greedy: a draft token stands when it is the target's own choice there, so the output is the
//!   target's greedy output, token for token.
//! - Sampling: a draft token d, drawn from the draft's distribution q, stands with probability
//!   min(1, p(d)/q(d)) against the target's p; a rejected one is replaced by a draw from
//!   max(0, p − q), renormalized. Each committed token then follows p exactly (Leviathan et al.,
//!   2023), whatever the draft.
//!
//! Each round commits the accepted tokens and one more from the target (the replacement, or a
//! bonus token after K accepted), so a round is never worse than a plain step.

use std::time::Instant;

use candle_core::Tensor;

use super::generate::{distribution, draw, Emitter, Generation, SamplingParams, StopReason};
use crate::error::Result;
use crate::model::{Decoder, KvCache, TokenizerInfo};
use crate::rng::KilnRng;

/// How the draft fared.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DraftStats {
    /// Tokens the draft proposed, and how many of them the target kept.
    pub proposed: usize,
    pub accepted: usize,
    /// Target forward passes after the prompt.
    pub target_passes: usize,
}

impl DraftStats {
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.proposed.max(1) as f64
    }
}

/// The token committed for draft token `d` (drawn from `q`) against the target's `p`, and
/// whether it is `d` itself (see the module docs). `p` and `q` are dense over the vocabulary.
pub fn verify(p: &[f64], q: &[f64], d: u32, rng: &mut KilnRng) -> (u32, bool) {
    let (pd, qd) = (p[d as usize], q[d as usize]);
    let keep = pd >= qd || (pd > 0.0 && rng.unit() < pd / qd);
    if keep {
        return (d, true);
    }
    let residual: Vec<(u32, f64)> = p
        .iter()
        .zip(q)
        .enumerate()
        .filter(|(_, (pi, qi))| pi > qi)
        .map(|(i, (pi, qi))| (i as u32, pi - qi))
        .collect();
    let total: f64 = residual.iter().map(|(_, r)| r).sum();
    let normalized: Vec<(u32, f64)> = residual.iter().map(|&(i, r)| (i, r / total)).collect();
    (draw(&normalized, rng), false)
}

/// A sampling distribution as a dense vector over `vocab` tokens.
fn dense(dist: &[(u32, f64)], vocab: usize) -> Vec<f64> {
    let mut out = vec![0.0; vocab];
    for &(t, p) in dist {
        out[t as usize] = p;
    }
    out
}

/// The token `dist` gives: its first (greedy) or a draw.
fn pick(dist: &[(u32, f64)], params: &SamplingParams, rng: &mut KilnRng) -> u32 {
    match params.temperature <= 0.0 {
        true => dist[0].0,
        false => draw(dist, rng),
    }
}

/// [`super::generate::generate`] with `draft` proposing up to `k` tokens a round. The two
/// models must share a tokenizer (the caller checks).
#[allow(clippy::too_many_arguments)]
pub fn generate_speculative(
    target: &Decoder,
    draft: &Decoder,
    k: usize,
    tok: &TokenizerInfo,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    stop_strings: &[String],
    on_text: &mut dyn FnMut(&str),
) -> Result<(Generation, DraftStats)> {
    let mut rng = KilnRng::fork(params.seed, 7);
    let vocab = target.config.vocab_size;
    let mut stats = DraftStats::default();
    // Each cache holds committed tokens (all of them, or all but the last, which the next round
    // feeds); with all of them, `*_next` holds the model's logits for the next position.
    let mut target_cache = KvCache::new(target.layers.len());
    let mut draft_cache = KvCache::new(draft.layers.len());
    let mut seq = prompt.to_vec();
    let ids = |t: &[u32], model: &Decoder| -> Result<Tensor> {
        Ok(Tensor::new(t, &model.device)?.unsqueeze(0)?)
    };
    let start = Instant::now();
    // The prompt in one pass, as plain generation runs it.
    let row = |logits: Tensor| -> Result<Vec<f32>> { Ok(logits.squeeze(0)?.to_vec1()?) };
    let mut target_next = Some(row(
        target.forward_cached(&ids(prompt, target)?, &mut target_cache)?
    )?);
    let mut draft_next = Some(row(
        draft.forward_cached(&ids(prompt, draft)?, &mut draft_cache)?
    )?);
    let prefill_s = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut out = Emitter::new(tok, stop_ids, stop_strings, on_text);
    let mut stop_reason = StopReason::MaxTokens;
    'rounds: while out.tokens.len() < params.max_new_tokens {
        let unseen = seq[target_cache.len..].to_vec();
        // A round commits at most k + 1 tokens, and its pass stays on one side of a LongRoPE
        // switch (where a pass of one token would rotate otherwise than a pass of many).
        let k_round = k.min(params.max_new_tokens - out.tokens.len() - 1).min(
            target
                .same_rotation_run(target_cache.len)
                .saturating_sub(unseen.len()),
        );
        let mut proposed = vec![];
        let mut draft_dists = vec![];
        let mut history = seq.clone();
        for _ in 0..k_round {
            let mut logits = match draft_next.take() {
                Some(l) => l,
                None => {
                    let fed = match proposed.last() {
                        Some(&d) => vec![d],
                        None => seq[draft_cache.len..].to_vec(),
                    };
                    row(draft.forward_cached(&ids(&fed, draft)?, &mut draft_cache)?)?
                }
            };
            let q = distribution(&mut logits, &history, params);
            let d = pick(&q, params, &mut rng);
            proposed.push(d);
            draft_dists.push(dense(&q, vocab));
            history.push(d);
        }
        // The target checks the proposals in one pass: its distribution for each proposal, and
        // one after the last.
        let mut input = unseen;
        input.extend(&proposed);
        let mut target_rows: Vec<Vec<f32>> = target_next.take().into_iter().collect();
        if !input.is_empty() {
            let all = target.forward_cached_all(&ids(&input, target)?, &mut target_cache)?;
            let fresh: Vec<Vec<f32>> = all.squeeze(0)?.to_vec2()?;
            let skip = fresh.len() - proposed.len() - usize::from(target_rows.is_empty());
            target_rows.extend(fresh.into_iter().skip(skip));
            stats.target_passes += 1;
        }
        stats.proposed += proposed.len();
        let mut committed = vec![];
        let mut history = seq.clone();
        for (i, mut logits) in target_rows.into_iter().enumerate() {
            let p = distribution(&mut logits, &history, params);
            let Some(&d) = proposed.get(i) else {
                // Every proposal stood: the target's own next token comes free.
                committed.push(pick(&p, params, &mut rng));
                break;
            };
            let (token, kept) = verify(&dense(&p, vocab), &draft_dists[i], d, &mut rng);
            committed.push(token);
            history.push(token);
            if !kept {
                break;
            }
            stats.accepted += 1;
        }
        // Roll back what was not committed; the last committed token is fed next round.
        let cached = seq.len() + committed.len() - 1;
        target_cache.truncate(cached)?;
        draft_cache.truncate(cached)?;
        draft_next = None;
        for t in committed {
            if let Some(reason) = out.push(t)? {
                stop_reason = reason;
                break 'rounds;
            }
            seq.push(t);
            if out.tokens.len() == params.max_new_tokens {
                break 'rounds;
            }
        }
    }
    out.finish();
    let generation = Generation {
        tokens: std::mem::take(&mut out.tokens),
        text: std::mem::take(&mut out.text),
        stop_reason,
        prompt_tokens: prompt.len(),
        prefill_s,
        decode_s: decode_start.elapsed().as_secs_f64(),
    };
    Ok((generation, stats))
}

/// Generation with a draft when one is given (`(draft, k)`), plain otherwise; the draft's
/// stats with it.
#[allow(clippy::too_many_arguments)]
pub fn generate_with(
    target: &Decoder,
    draft: Option<(&Decoder, usize)>,
    tok: &TokenizerInfo,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    stop_strings: &[String],
    on_text: &mut dyn FnMut(&str),
) -> Result<(Generation, Option<DraftStats>)> {
    match draft {
        Some((d, k)) => {
            let (g, stats) = generate_speculative(
                target,
                d,
                k,
                tok,
                prompt,
                params,
                stop_ids,
                stop_strings,
                on_text,
            )?;
            Ok((g, Some(stats)))
        }
        None => Ok((
            super::generate::generate(
                target,
                tok,
                prompt,
                params,
                stop_ids,
                stop_strings,
                on_text,
            )?,
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drafts drawn from q and verified against p give tokens distributed as p: a chi-square
    /// test over 20,000 draws on a 5-token vocabulary (df 4: 18.47 is the 0.1% tail), for a draft
    /// close to the target, one far from it, and one that never proposes a likely token.
    #[test]
    fn verified_drafts_follow_the_target_distribution() {
        let p = [0.05, 0.4, 0.3, 0.2, 0.05];
        for q in [
            [0.1, 0.35, 0.3, 0.15, 0.1],
            [0.6, 0.1, 0.1, 0.1, 0.1],
            [0.5, 0.0, 0.5, 0.0, 0.0],
        ] {
            let mut rng = KilnRng::new(11);
            let q_dist: Vec<(u32, f64)> = q
                .iter()
                .enumerate()
                .filter(|(_, &x)| x > 0.0)
                .map(|(i, &x)| (i as u32, x))
                .collect();
            let n = 20_000;
            let mut counts = [0usize; 5];
            for _ in 0..n {
                let d = draw(&q_dist, &mut rng);
                let (t, _) = verify(&p, &q, d, &mut rng);
                counts[t as usize] += 1;
            }
            let chi2: f64 = counts
                .iter()
                .zip(p)
                .map(|(&c, pi)| {
                    let e = pi * n as f64;
                    (c as f64 - e).powi(2) / e
                })
                .sum();
            assert!(
                chi2 < 18.47,
                "q {q:?}: chi-square {chi2}, counts {counts:?}"
            );
        }
        // Against the draft's own distribution every token would stand: the test can fail.
        let mut rng = KilnRng::new(12);
        let q = [0.6, 0.1, 0.1, 0.1, 0.1];
        let q_dist: Vec<(u32, f64)> = (0..5).map(|i| (i as u32, q[i])).collect();
        let zeros = (0..20_000).filter(|_| draw(&q_dist, &mut rng) == 0).count();
        let chi2_zero = (zeros as f64 - 0.05 * 20_000.0).powi(2) / (0.05 * 20_000.0);
        assert!(chi2_zero > 18.47);
    }
}

/// What `--draft` asks for: a small model sharing the target's tokenizer, its adapter, how
/// many tokens it proposes a round, and how many of its first layers to keep.
#[derive(Debug, Clone)]
pub struct DraftSpec {
    pub model: String,
    pub adapter: Option<std::path::PathBuf>,
    pub tokens: usize,
    pub layers: Option<usize>,
}

/// Loads the draft of `spec` as the target was loaded (`target`: its device and dtype), dense
/// with its adapter added into its weights unless `target.quantize` says otherwise; refused
/// when its tokenizer is not the target's (`tok`).
pub fn load_draft(
    spec: &DraftSpec,
    target: &super::InferenceOptions,
    tok: &TokenizerInfo,
) -> Result<crate::model::LoadedModel> {
    use crate::error::KilnError;
    if spec.tokens == 0 {
        return Err(KilnError::Usage("--draft-tokens must be at least 1".into()));
    }
    // The draft's proposals never change the output, only how many stand, and its speed is the
    // whole point: it is held dense unless --quantize says otherwise (NF4 is dequantized at every
    // call), with its adapter added into the weights rather than run beside them.
    let mut options = super::InferenceOptions {
        layers: spec.layers,
        merge_adapter: true,
        ..target.clone()
    };
    options.quantize.get_or_insert(false);
    let d = super::load(&spec.model, spec.adapter.as_deref(), &options)?;
    crate::tokenizer::check_same_ids(tok, &d.tokenizer).map_err(|why| {
        KilnError::Usage(format!(
            "--draft {}: its tokenizer differs from the model's ({why}); a draft must share the model's tokenizer",
            spec.model
        ))
    })?;
    Ok(d)
}

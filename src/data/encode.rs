//! Samples to token ids and a loss mask.
//!
//! Conversations are rendered once with the chat template and tokenized as one string (so the
//! ids are exactly transformers' `apply_chat_template(..., tokenize=True)`). Assistant turns are
//! found by rendering prefixes: turn k starts where the render of the messages before it with
//! `add_generation_prompt=True` ends (or, for templates without a generation prompt, where its
//! content starts), and ends where the render of the messages up to it stops agreeing with the
//! full render, so its end-of-turn tokens are included, but not the whitespace a template puts
//! after an end-of-turn special token (never generated). A token carries loss when it ends
//! inside such a span.

use super::formats::Sample;
use super::template::ChatTemplate;
use super::Example;
use crate::tokenizer::TokenizerInfo;

/// What to feed the tokenizer for a sample, and how.
pub struct Encoder<'a> {
    pub tokenizer: &'a TokenizerInfo,
    /// The template for conversations (`None`: conversations are an error).
    pub chat_template: Option<&'a ChatTemplate>,
    /// Render alpaca and prompt/completion rows through the chat template as well.
    pub template_plain_rows: bool,
    pub train_on_inputs: bool,
    /// Only the last assistant turn of a conversation carries loss (`data.train_turns = "last"`).
    pub last_turn_only: bool,
    /// Put BOS in front of plain rows whose tokenizer adds none (`data.add_bos`).
    pub add_bos: bool,
}

/// A sample's tokens and the text they came from (for `kiln data inspect`).
pub struct Encoded {
    pub example: Example,
    pub text: String,
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Back off to a character boundary of both.
    (0..=n).rev().find(|&i| a.is_char_boundary(i)).unwrap_or(0)
}

/// A prompt/completion row as a conversation: optional system, user, and the answer if given.
fn prompted_messages(
    system: &Option<String>,
    user: &str,
    completion: Option<&str>,
) -> Vec<serde_json::Value> {
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    messages.push(serde_json::json!({"role": "user", "content": user}));
    if let Some(c) = completion {
        messages.push(serde_json::json!({"role": "assistant", "content": c}));
    }
    messages
}

impl Encoder<'_> {
    /// The examples of a sample: one, or for a conversation whose template renders earlier
    /// turns differently once later ones exist, one per assistant turn (see [`Self::chat`]).
    pub fn encode(&self, sample: &Sample) -> Result<Vec<Encoded>, String> {
        match sample {
            Sample::Chat { messages, tools } => self.chat(messages, tools.as_ref()),
            Sample::Prompted {
                completion,
                system,
                user,
                ..
            } if self.template_plain_rows => {
                self.chat(&prompted_messages(system, user, Some(completion)), None)
            }
            other => Ok(vec![self.encode_plain(other)?]),
        }
    }

    /// A sample that is not a conversation: text, token ids, or a prompt and completion.
    fn encode_plain(&self, sample: &Sample) -> Result<Encoded, String> {
        match sample {
            Sample::Text(text) => self.plain(text, "", true),
            Sample::Tokens {
                input_ids,
                loss_mask,
            } => {
                let vocab = self.tokenizer.tokenizer.get_vocab_size(true);
                if let Some(&bad) = input_ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(format!(
                        "token id {bad} is outside the tokenizer's vocabulary of {vocab}"
                    ));
                }
                Ok(Encoded {
                    example: Example::new(input_ids.clone(), loss_mask.clone()),
                    text: String::new(),
                })
            }
            Sample::Prompted {
                prompt, completion, ..
            } => self.plain(prompt, completion, self.train_on_inputs),
            Sample::Chat { .. } => Err("a conversation needs its chat template".into()),
        }
    }

    /// The prompt of a sample for generation (its conversation up to the last assistant turn,
    /// with the generation prompt), and the reference answer (that turn, or the completion).
    pub fn prompt(&self, sample: &Sample) -> Result<(Vec<u32>, String), String> {
        let chat = |messages: &[serde_json::Value], tools: Option<&serde_json::Value>| {
            self.chat_template
                .ok_or("conversation rows need a chat template; set --chat-template")?
                .prompt_ids(self.tokenizer, messages, tools)
        };
        match sample {
            Sample::Tokens { .. } => Err("pre-tokenized rows have no prompt and answer; use a prompt/completion, alpaca or conversation format".into()),
            Sample::Text(_) => Err("text rows have no prompt and answer; use a prompt/completion, alpaca or conversation format".into()),
            Sample::Prompted { prompt, completion, system, user } => {
                let ids = if self.template_plain_rows {
                    chat(&prompted_messages(system, user, None), None)?
                } else {
                    self.plain_prompt(prompt)?
                };
                Ok((ids, completion.clone()))
            }
            Sample::Chat { messages, tools } => {
                let last = messages
                    .iter()
                    .rposition(|m| m["role"] == "assistant")
                    .ok_or("the conversation has no assistant message to compare with")?;
                let reference = messages[last]["content"].as_str().unwrap_or("").to_string();
                Ok((chat(&messages[..last], tools.as_ref())?, reference))
            }
        }
    }

    /// `tokenizer(prompt) + tokenizer(completion, add_special_tokens=False) + [eos]`, as
    /// transformers and TRL make plain rows: only the special tokens the tokenizer's
    /// post-processor adds (BOS in front only with `data.add_bos`), EOS at the end unless the
    /// text already ends with it. The prompt is masked unless `train_prompt`.
    fn plain(&self, prompt: &str, completion: &str, train_prompt: bool) -> Result<Encoded, String> {
        let tok = self.tokenizer;
        let err = |e: crate::error::KilnError| e.to_string();
        let mut ids = self.plain_prompt(prompt)?;
        let n_prompt = ids.len();
        ids.extend(tok.encode(completion, false).map_err(err)?);
        if ids.last() != Some(&tok.eos_id) {
            ids.push(tok.eos_id);
        }
        let loss_mask = (0..ids.len())
            .map(|i| train_prompt || i >= n_prompt)
            .collect();
        let text = tok.decode(&ids).map_err(err)?;
        Ok(Encoded {
            example: Example::new(ids, loss_mask),
            text,
        })
    }

    /// `tokenizer(prompt)`, with BOS in front if `data.add_bos` asks and the tokenizer added none.
    fn plain_prompt(&self, prompt: &str) -> Result<Vec<u32>, String> {
        let tok = self.tokenizer;
        let mut ids = tok.encode(prompt, true).map_err(|e| e.to_string())?;
        if let Some(bos) = tok
            .bos_id
            .filter(|&b| self.add_bos && ids.first() != Some(&b))
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// A conversation's tokens with every assistant turn (and its end-of-turn tokens) trained.
    /// Templates that render an earlier turn differently once a later one exists (Qwen 3 drops
    /// or adds `<think>` blocks by position) give one example per assistant turn instead, each
    /// the conversation up to that turn, rendered with it last and only it trained: every turn
    /// is trained as the model sees it when it generates that turn.
    fn chat(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<Encoded>, String> {
        let template = self.chat_template.ok_or(
            "conversation rows need a chat template and the model has none; set data.chat_template to a built-in (alpaca, chatml, llama3, phi3, mistral, gemma) or a .jinja file",
        )?;
        let specials = &self.tokenizer.special_tokens;
        let render = |msgs: &[serde_json::Value], gen: bool| {
            template
                .render(msgs, tools, gen, specials)
                .map_err(|e| format!("chat template ({}): {e}", template.origin))
        };
        let full = render(messages, false)?;
        if self.train_on_inputs {
            return Ok(vec![self.masked(full, None)?]);
        }
        let mut turns: Vec<usize> = (0..messages.len())
            .filter(|&k| messages[k]["role"] == "assistant")
            .collect();
        // `train_turns = "last"`: the conversation up to its last assistant turn, only that
        // turn trained (the per-turn path below, for one turn).
        if self.last_turn_only {
            turns = turns.split_off(turns.len().saturating_sub(1));
        }
        let ends = self.end_of_turn_texts();
        let span = |msgs: &[serde_json::Value], k: usize, text: &str| {
            turn_span(&render, msgs, k, text, &template.origin, &ends)
        };
        if !self.last_turn_only || turns.is_empty() {
            let spans = turns
                .iter()
                .map(|&k| span(messages, k, &full))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(spans) = spans.into_iter().collect::<Option<Vec<_>>>() {
                return Ok(vec![self.masked(full, Some(&spans))?]);
            }
        }
        turns
            .iter()
            .map(|&k| {
                let upto = &messages[..=k];
                let text = render(upto, false)?;
                let span = span(upto, k, &text)?.ok_or_else(|| {
                    format!(
                        "chat template ({}) renders assistant message {} as nothing even when it is the last one; set data.train_on_inputs = true or use another data.chat_template",
                        template.origin,
                        k + 1
                    )
                })?;
                self.masked(text, Some(&[span]))
            })
            .collect()
    }

    /// The texts of the tokenizer's special tokens (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
    /// ...): a turn that ends with one of them and then whitespace ends at the token.
    fn end_of_turn_texts(&self) -> Vec<String> {
        self.tokenizer
            .tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.trim().is_empty())
            .map(|t| t.content)
            .collect()
    }

    /// `text` tokenized, with the tokens inside `spans` trained (all of them when `None`).
    fn masked(&self, text: String, spans: Option<&[(usize, usize)]>) -> Result<Encoded, String> {
        let (ids, offsets) = self
            .tokenizer
            .encode_with_offsets(&text)
            .map_err(|e| e.to_string())?;
        let loss_mask = match spans {
            None => vec![true; ids.len()],
            // A token that starts before the turn but ends in it holds turn text (a space
            // merged with the first word); one that runs past the turn's end does not count.
            Some(spans) => offsets
                .iter()
                .map(|&(s, e)| e > s && spans.iter().any(|&(a, b)| e > a && e <= b))
                .collect(),
        };
        Ok(Encoded {
            example: Example::new(ids, loss_mask),
            text,
        })
    }
}

/// A chat template's rendering of messages, with or without the generation prompt.
type Render<'a> = dyn Fn(&[serde_json::Value], bool) -> Result<String, String> + 'a;

/// The byte range of assistant message `k` (content and end-of-turn text) in `full`, the render
/// of `messages`: from where the render of the messages before it with the generation prompt
/// ends (or, for templates without one, where its content starts) to where the render of the
/// messages up to it stops agreeing with `full`, less any whitespace after a final end-of-turn
/// token (one of `ends`). `None` when that render agrees with `full` no further than the turn's
/// start: the template renders the turn otherwise once it is not last.
fn turn_span(
    render: &Render,
    messages: &[serde_json::Value],
    k: usize,
    full: &str,
    origin: &str,
    ends: &[String],
) -> Result<Option<(usize, usize)>, String> {
    let before = render(&messages[..k], true)?;
    if !full.starts_with(&before) {
        return Err(format!(
            "chat template ({origin}) renders the conversation before assistant message {} differently from the start of the whole conversation, so the assistant tokens cannot be located; set data.train_on_inputs = true or use another data.chat_template",
            k + 1
        ));
    }
    let upto = render(&messages[..=k], false)?;
    let end = common_prefix_len(&upto, full);
    if end <= before.len() {
        return Ok(None);
    }
    // Templates without a generation prompt leave the assistant header in the turn: the turn's
    // loss starts at its content. With a generation prompt, everything after it is generated
    // (a reasoning block before the content too).
    let has_generation_prompt = render(&messages[..k], false)? != before;
    let content = messages[k]["content"].as_str().unwrap_or("").trim();
    let start = match full[before.len()..end].find(content) {
        Some(offset) if !content.is_empty() && !has_generation_prompt => before.len() + offset,
        _ => before.len(),
    };
    let turn = full[start..end].trim_end();
    let end = if ends.iter().any(|e| turn.ends_with(e.as_str())) {
        start + turn.len()
    } else {
        end
    };
    Ok(Some((start, end)))
}

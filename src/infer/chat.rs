//! `kiln generate`'s work: one prompt, one chat turn, or a conversation read line by line,
//! each streamed as it is generated (with a speculative draft, if one is given).

use std::io::{BufRead, Write};

use super::generate::{Generation, SamplingParams};
use crate::error::{KilnError, Result};
use crate::model::LoadedModel;

/// What to generate from, and how.
pub struct Request<'a> {
    /// The prompt; with `chat` the user's message. Without it (and with `chat`), a conversation
    /// read from the input.
    pub prompt: Option<String>,
    /// Render the messages with the chat template.
    pub chat: bool,
    pub system: Option<String>,
    /// `model`, a built-in template name or a .jinja file.
    pub chat_template: &'a str,
    pub sampling: SamplingParams,
    /// Texts that end the generation.
    pub stop: &'a [String],
    /// Print one JSON result instead of streaming.
    pub json: bool,
    /// With a draft: also generate without it and compare the speeds.
    pub compare_plain: bool,
}

/// Generates for `req` with `loaded` (and `draft`: a model and its tokens a round), reading the
/// conversation's lines from `input` in interactive chat.
pub fn run(
    loaded: &LoadedModel,
    draft: Option<(&LoadedModel, usize)>,
    req: &Request,
    input: &mut dyn BufRead,
) -> Result<()> {
    let (chat, json, stop, params) = (req.chat, req.json, req.stop, &req.sampling);
    if !chat && req.prompt.is_none() {
        return Err(KilnError::Usage(
            "give --prompt TEXT, or --chat for a conversation".into(),
        ));
    }
    let tok = &loaded.tokenizer;
    let stops = super::generate::stop_tokens(tok, &loaded.model, &loaded.dir);
    let template = if chat {
        let mut extra = toml::Table::new();
        extra.insert(
            "chat_template".into(),
            toml::Value::String(req.chat_template.to_string()),
        );
        let cfg = crate::recipe::DataSection::for_command(&[], extra)?;
        let t = crate::data::resolve_template(&cfg, tok)?.template;
        Some(t.ok_or_else(|| {
            KilnError::Usage(
                "the model has no chat template; pass --chat-template chatml (or another built-in)"
                    .into(),
            )
        })?)
    } else {
        None
    };
    let mut stdout = std::io::stdout();
    let mut run = |ids: Vec<u32>| -> Result<Generation> {
        let mut print = |piece: &str| {
            if !json {
                print!("{piece}");
                let _ = stdout.flush();
            }
        };
        let (g, stats) = crate::infer::speculative::generate_with(
            &loaded.model,
            draft.map(|(d, k)| (&d.model, k)),
            tok,
            &ids,
            params,
            &stops,
            stop,
            &mut print,
        )?;
        if !json {
            println!();
            eprintln!(
                "[{} prompt tokens, {} new tokens, {:.1} tokens/s, stopped: {:?}]",
                g.prompt_tokens,
                g.tokens.len(),
                g.tokens_per_s(),
                g.stop_reason
            );
        }
        if let Some(s) = stats {
            let mut line = format!(
                "[draft: {} of {} proposed tokens accepted ({:.0}%), {} target passes for {} tokens",
                s.accepted,
                s.proposed,
                100.0 * s.acceptance_rate(),
                s.target_passes,
                g.tokens.len()
            );
            if req.compare_plain {
                let plain = crate::infer::generate::generate(
                    &loaded.model,
                    tok,
                    &ids,
                    params,
                    &stops,
                    stop,
                    &mut |_| {},
                )?;
                line.push_str(&format!(
                    "; without the draft {:.1} tokens/s ({:.2}x), {} output",
                    plain.tokens_per_s(),
                    g.tokens_per_s() / plain.tokens_per_s().max(1e-9),
                    if plain.tokens == g.tokens {
                        "the same"
                    } else {
                        "another (sampled)"
                    }
                ));
            }
            eprintln!("{line}]");
        }
        Ok(g)
    };
    let render = |messages: &[serde_json::Value]| -> Result<Vec<u32>> {
        template
            .as_ref()
            .expect("chat mode has a template")
            .prompt_ids(tok, messages, None)
            .map_err(KilnError::Usage)
    };
    let mut messages = vec![];
    if let Some(s) = &req.system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    match (chat, req.prompt.clone()) {
        (false, Some(p)) => {
            let g = run(tok.encode(&p, true)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&g).expect("serializable")
                );
            }
        }
        (true, Some(p)) => {
            messages.push(serde_json::json!({"role": "user", "content": p}));
            let g = run(render(&messages)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&g).expect("serializable")
                );
            }
        }
        (true, None) => {
            eprintln!("chat: type a message and press Enter; /exit or Ctrl-D ends");
            loop {
                eprint!("> ");
                let mut line = String::new();
                if input
                    .read_line(&mut line)
                    .map_err(|e| KilnError::io("stdin", e))?
                    == 0
                {
                    break;
                }
                let line = line.trim_end_matches(['\n', '\r']);
                if line == "/exit" {
                    break;
                }
                messages.push(serde_json::json!({"role": "user", "content": line}));
                let g = run(render(&messages)?)?;
                messages.push(serde_json::json!({"role": "assistant", "content": g.text}));
            }
        }
        (false, None) => unreachable!("checked above"),
    }
    Ok(())
}

//! Chat templates and conversation tokenization against transformers 5.17
//! (tests/fixtures/chat_golden.json, made by scripts/golden/make_chat_golden.py), on the real tokenizer
//! files of Phi-3 mini, Qwen 2.5 instruct, Llama 3 instruct and Phi-4, Qwen 3's template (from
//! llama.cpp's models/templates) over Qwen 2.5's vocabulary, and the multi-turn rows of the shipped
//! ShareGPT and tool-calling samples.

use std::path::Path;

use kiln::data::formats::{self, Sample};
use kiln::data::ChatTemplate;
use kiln::recipe::{DataFormat, DataSection};
use kiln::tokenizer::TokenizerInfo;
use serde_json::Value;

const FIX: &str = "tests/fixtures";

mod common;
use common::tokenizer_dir;

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIX}/chat_golden.json")).unwrap())
        .unwrap()
}

fn sharegpt_section() -> DataSection {
    let r = kiln::recipe::Recipe::parse(
        Path::new("t.toml"),
        "[model]\npath='x'\n[data]\npath='x'\nformat='sharegpt'\n[output]\ndir='x'\n",
        &[],
    )
    .unwrap();
    r.data
}

/// The golden conversations, read from the sample files by kiln's sharegpt reader.
fn conversations(g: &Value) -> Vec<(Vec<Value>, Option<Value>)> {
    let cfg = sharegpt_section();
    g["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let file = format!("{FIX}/data/{}", c["source"].as_str().unwrap());
            let rows: Vec<Value> =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            let mut row = rows[c["row"].as_u64().unwrap() as usize].clone();
            if let Some(system) = c.get("system") {
                row["system"] = system.clone();
            }
            match formats::parse(&row, DataFormat::Sharegpt, &cfg).unwrap() {
                Sample::Chat { messages, tools } => {
                    // kiln's reading of the row is the conversation transformers was given.
                    let plain: Vec<Value> = messages
                        .iter()
                        .map(|m| serde_json::json!({"role": m["role"], "content": m["content"]}))
                        .collect();
                    assert_eq!(Value::Array(plain), c["messages"]);
                    assert_eq!(tools.as_ref().unwrap_or(&Value::Null), &c["tools"]);
                    (messages, tools)
                }
                other => panic!("not a conversation: {other:?}"),
            }
        })
        .collect()
}

/// The messages a golden render case rendered (the conversation without its last turn when it
/// asked for the generation prompt), its tools, and whether it asked.
fn golden_case<'a>(
    convs: &'a [(Vec<Value>, Option<Value>)],
    case: &Value,
) -> (&'a [Value], &'a Option<Value>, bool) {
    let (messages, tools) = &convs[case["conversation"].as_u64().unwrap() as usize];
    let gen = case["add_generation_prompt"].as_bool().unwrap();
    let n = if gen {
        messages.len() - 1
    } else {
        messages.len()
    };
    (&messages[..n], tools, gen)
}

#[test]
fn templates_and_token_ids_equal_transformers() {
    let g = golden();
    let convs = conversations(&g);
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for name in ["phi3", "qwen2.5", "llama3-instruct", "phi4", "qwen3"] {
        let dir = if name == "qwen3" {
            // Qwen 2.5's vocabulary with Qwen3-0.6B's template (chat_template.jinja).
            let d = tokenizer_dir("qwen2.5", &tmp.path().join("q3"));
            std::fs::copy(
                format!("{FIX}/templates/Qwen-Qwen3-0.6B.jinja"),
                d.join("chat_template.jinja"),
            )
            .unwrap();
            d
        } else {
            tokenizer_dir(name, tmp.path())
        };
        let (tok, specials, template) = if name == "phi4" {
            // No tokenizer.json for Phi-4: render only, with its config's special tokens.
            let cfg: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            let specials: Vec<(String, String)> =
                ["bos_token", "eos_token", "unk_token", "pad_token"]
                    .iter()
                    .filter_map(|k| Some((k.to_string(), cfg[*k].as_str()?.to_string())))
                    .collect();
            let t = ChatTemplate::compile(cfg["chat_template"].as_str().unwrap(), "phi4").unwrap();
            (None, specials, t)
        } else {
            let tok = TokenizerInfo::load(&dir, Default::default()).unwrap();
            let (src, origin) = tok.chat_template.clone().expect("model template");
            let t = ChatTemplate::compile(&src, &origin).unwrap();
            let specials = tok.special_tokens.clone();
            (Some(tok), specials, t)
        };
        for case in g["renders"][name].as_array().unwrap() {
            let (msgs, tools, gen) = golden_case(&convs, case);
            let text = template
                .render(msgs, tools.as_ref(), gen, &specials)
                .unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "{name} conversation {case}"
            );
            if let Some(tok) = &tok {
                let (ids, _) = tok.encode_with_offsets(&text).unwrap();
                let want: Vec<u32> = case["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(ids, want, "{name}: token ids of {text:?}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * 18);
}

#[test]
fn builtin_templates_render_as_the_models_own() {
    let g = golden();
    let convs = conversations(&g);
    let tmp = tempfile::tempdir().unwrap();
    for (builtin, model) in [
        ("llama3", "llama3-instruct"),
        ("phi3", "phi3"),
        ("chatml", "qwen2.5"),
    ] {
        let tok =
            TokenizerInfo::load(&tokenizer_dir(model, tmp.path()), Default::default()).unwrap();
        let (src, origin) = tok.chat_template.clone().unwrap();
        let own = ChatTemplate::compile(&src, &origin).unwrap();
        let ours = ChatTemplate::builtin(builtin).unwrap();
        let mut compared = 0;
        for (messages, tools) in &convs {
            // Qwen's template adds a default system prompt and tool instructions; chatml does not.
            if builtin == "chatml" && (tools.is_some() || messages[0]["role"] != "system") {
                continue;
            }
            for gen in [false, true] {
                let a = own
                    .render(messages, tools.as_ref(), gen, &tok.special_tokens)
                    .unwrap();
                let b = ours
                    .render(messages, tools.as_ref(), gen, &tok.special_tokens)
                    .unwrap();
                assert_eq!(a, b, "built-in {builtin} vs {model}");
                compared += 1;
            }
        }
        assert!(compared >= 2, "{builtin}: {compared}");
    }
}

/// Trained runs of tokens: (decoded text, token count).
/// The encoder of conversations through `template`, assistant turns trained (the defaults).
fn chat_encoder<'a>(
    tok: &'a TokenizerInfo,
    template: &'a ChatTemplate,
) -> kiln::data::encode::Encoder<'a> {
    kiln::data::encode::Encoder {
        tokenizer: tok,
        chat_template: Some(template),
        template_plain_rows: false,
        train_on_inputs: false,
        last_turn_only: false,
        add_bos: false,
    }
}

fn trained_runs(tok: &TokenizerInfo, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = vec![];
    let mut i = 0;
    while i < ids.len() {
        if mask[i] {
            let start = i;
            while i < ids.len() && mask[i] {
                i += 1;
            }
            runs.push(tok.tokenizer.decode(&ids[start..i], false).unwrap());
        } else {
            i += 1;
        }
    }
    runs
}

#[test]
fn every_assistant_turn_and_its_end_of_turn_token_carry_loss_and_nothing_else() {
    let g = golden();
    let convs = conversations(&g);
    let tmp = tempfile::tempdir().unwrap();
    for (name, end_of_turn) in [
        ("phi3", "<|end|>"),
        ("qwen2.5", "<|im_end|>"),
        ("llama3-instruct", "<|eot_id|>"),
    ] {
        let tok =
            TokenizerInfo::load(&tokenizer_dir(name, tmp.path()), Default::default()).unwrap();
        let (src, origin) = tok.chat_template.clone().unwrap();
        let template = ChatTemplate::compile(&src, &origin).unwrap();
        for train_on_inputs in [false, true] {
            let encoder = kiln::data::encode::Encoder {
                train_on_inputs,
                ..chat_encoder(&tok, &template)
            };
            for (messages, tools) in &convs {
                let sample = Sample::Chat {
                    messages: messages.clone(),
                    tools: tools.clone(),
                };
                let mut encoded = encoder.encode(&sample).unwrap();
                // These templates render each turn the same whatever follows: one example.
                assert_eq!(encoded.len(), 1, "{name}");
                let enc = encoded.remove(0);
                let ex = &enc.example;
                if train_on_inputs {
                    assert!(ex.loss_mask.iter().all(|&m| m));
                    continue;
                }
                let runs = trained_runs(&tok, &ex.input_ids, &ex.loss_mask);
                let assistant: Vec<&str> = messages
                    .iter()
                    .filter(|m| m["role"] == "assistant")
                    .map(|m| m["content"].as_str().unwrap())
                    .collect();
                assert_eq!(runs.len(), assistant.len(), "{name}: {runs:?}");
                for (run, content) in runs.iter().zip(&assistant) {
                    assert!(
                        run.contains(content.trim()),
                        "{name}: {run:?} lacks {content:?}"
                    );
                    assert!(
                        run.contains(end_of_turn),
                        "{name}: {run:?} lacks {end_of_turn}"
                    );
                    // Nothing of the next user turn leaks in.
                    assert!(!run.contains("user"), "{name}: {run:?}");
                }
                // Each user message is fully masked.
                let masked = tok
                    .tokenizer
                    .decode(&ex.ids_where_trained(false), false)
                    .unwrap();
                for m in messages.iter().filter(|m| m["role"] == "user") {
                    let first_words: String = m["content"]
                        .as_str()
                        .unwrap()
                        .trim()
                        .chars()
                        .take(12)
                        .collect();
                    assert!(
                        masked.contains(&first_words),
                        "{name}: user text {first_words:?} not masked"
                    );
                }
            }
        }
    }
}

#[test]
fn phi3_tokenizes_as_transformers_5_after_special_tokens() {
    // transformers 5 rebuilds Llama-class tokenizers without the legacy Prepend normalizer:
    // "<|user|>\nWho" gives "Who", not "▁Who"; a plain text start still gets "▁".
    let tmp = tempfile::tempdir().unwrap();
    let tok = TokenizerInfo::load(&tokenizer_dir("phi3", tmp.path()), Default::default()).unwrap();
    let (ids, _) = tok.encode_with_offsets("<|user|>\nWho are you?").unwrap();
    assert_eq!(ids, vec![32010, 22110, 526, 366, 29973]);
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![15043, 3186]);
}

/// Qwen 3's template renders an assistant turn with an empty `<think>` block only while it is the
/// last one, so no single rendering shows every turn as the model generates it: the conversation
/// becomes one example per assistant turn, each the render of the conversation up to that turn
/// with only that turn (and its `<|im_end|>`) trained. The example of the last turn is the whole
/// conversation, token for token transformers' `apply_chat_template` (chat_golden.json).
#[test]
fn qwen3_conversations_become_one_example_per_assistant_turn() {
    let g = golden();
    let convs = conversations(&g);
    let tmp = tempfile::tempdir().unwrap();
    let (tok, template) = qwen3_tokenizer(tmp.path());
    let encoder = chat_encoder(&tok, &template);
    let mut expanded = 0;
    for (ci, (messages, tools)) in convs.iter().enumerate() {
        let sample = Sample::Chat {
            messages: messages.clone(),
            tools: tools.clone(),
        };
        let examples = encoder.encode(&sample).unwrap();
        let turns: Vec<usize> = (0..messages.len())
            .filter(|&k| messages[k]["role"] == "assistant")
            .collect();
        assert!(examples.len() == turns.len() || examples.len() == 1, "{ci}");
        if examples.len() > 1 {
            expanded += 1;
            for (enc, &k) in examples.iter().zip(&turns) {
                let text = template
                    .render(&messages[..=k], tools.as_ref(), false, &tok.special_tokens)
                    .unwrap();
                assert_eq!(enc.text, text, "conversation {ci} turn {k}");
                let ex = &enc.example;
                let runs = trained_runs(&tok, &ex.input_ids, &ex.loss_mask);
                assert_eq!(runs.len(), 1, "conversation {ci} turn {k}: {runs:?}");
                let content = messages[k]["content"].as_str().unwrap().trim();
                assert!(runs[0].contains(content), "{runs:?} lacks {content:?}");
                assert!(runs[0].contains("<|im_end|>"), "{runs:?}");
            }
        }
        let want: Vec<u32> = g["renders"]["qwen3"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["conversation"] == ci && c["add_generation_prompt"] == false)
            .unwrap()["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            examples.last().unwrap().example.input_ids,
            want,
            "conversation {ci}"
        );
    }
    // The multi-turn conversations (4 and 6 messages, with and without tools) expand.
    assert!(expanded >= 4, "{expanded}");
}

/// Qwen 2.5's vocabulary with Qwen 3's template (llama.cpp's copy of Qwen3-0.6B's), as
/// chat_golden.json's `qwen3` renders were made.
fn qwen3_tokenizer(tmp: &Path) -> (TokenizerInfo, ChatTemplate) {
    let dir = tokenizer_dir("qwen2.5", tmp);
    std::fs::copy(
        format!("{FIX}/templates/Qwen-Qwen3-0.6B.jinja"),
        dir.join("chat_template.jinja"),
    )
    .unwrap();
    let tok = TokenizerInfo::load(&dir, Default::default()).unwrap();
    let (src, origin) = tok.chat_template.clone().unwrap();
    let template = ChatTemplate::compile(&src, &origin).unwrap();
    (tok, template)
}

/// Templates whose models' tokenizers shared/data lacks, rendered as transformers renders them
/// (chat_golden.json, from llama.cpp's copies in tests/fixtures/templates/), and refusing what
/// transformers refuses:
/// - Gemma 2's instruct template (which Gemma's and Gemma 3's follow): a system message, and
///   roles that do not alternate (tool turns);
/// - Phi-3.5-mini-instruct's: renders every conversation;
/// - Mistral Nemo Instruct's: tool turns without Mistral's 9-character call ids.
#[test]
fn render_only_templates_render_and_refuse_as_transformers() {
    let g = golden();
    let convs = conversations(&g);
    for (key, want) in [
        ("gemma2-it", (12, 6)),
        ("phi3.5", (18, 0)),
        ("mistral-nemo", (14, 4)),
    ] {
        let cases = g["renders"][key].as_array().unwrap();
        let file = cases[0]["template"].as_str().unwrap();
        let src = std::fs::read_to_string(format!("{FIX}/templates/{file}")).unwrap();
        let template = ChatTemplate::compile(&src, file).unwrap();
        let specials: Vec<(String, String)> = cases[0]["specials"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let (mut rendered, mut refused) = (0, 0);
        for case in cases {
            let (msgs, tools, gen) = golden_case(&convs, case);
            let got = template.render(msgs, tools.as_ref(), gen, &specials);
            match case.get("error").and_then(Value::as_str) {
                Some(error) => {
                    let err = got
                        .expect_err("transformers refuses this conversation")
                        .to_string();
                    assert!(err.contains(error), "{key}: {err} lacks {error}");
                    refused += 1;
                }
                None => {
                    assert_eq!(
                        got.unwrap(),
                        case["text"].as_str().unwrap(),
                        "{key}: {case}"
                    );
                    rendered += 1;
                }
            }
        }
        assert_eq!((rendered, refused), want, "{key}");
    }
}

/// Conversations with reasoning (chat_golden.json's `reasoning`: in a `reasoning_content` key,
/// and inline as `<think>…</think>` in the content), read by kiln's messages reader and rendered
/// with Qwen 3's template: one example per assistant turn, each token for token transformers'
/// render of the conversation up to that turn, and its trained tokens exactly what the model
/// generates for that turn given transformers' generation prompt: the reasoning block, the
/// answer and `<|im_end|>` (not the newline after it, which is never generated).
#[test]
fn reasoning_turns_train_as_the_model_generates_them() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let (tok, template) = qwen3_tokenizer(tmp.path());
    let cfg = kiln::recipe::Recipe::parse(
        Path::new("t.toml"),
        "[model]\npath='x'\n[data]\npath='x'\nformat='messages'\n[output]\ndir='x'\n",
        &[],
    )
    .unwrap()
    .data;
    for (ci, case) in g["reasoning"].as_array().unwrap().iter().enumerate() {
        let row = serde_json::json!({"messages": case["messages"]});
        let sample = formats::parse(&row, DataFormat::Messages, &cfg).unwrap();
        let encoder = chat_encoder(&tok, &template);
        let examples = encoder.encode(&sample).unwrap();
        let turns = case["qwen3"].as_array().unwrap();
        assert_eq!(examples.len(), turns.len(), "conversation {ci}");
        for (enc, want) in examples.iter().zip(turns) {
            let k = want["turn"].as_u64().unwrap();
            assert_eq!(
                enc.text,
                want["text"].as_str().unwrap(),
                "conversation {ci} turn {k}"
            );
            let ids: Vec<u32> = want["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(enc.example.input_ids, ids, "conversation {ci} turn {k}");
            let (text, prompt) = (
                want["text"].as_str().unwrap(),
                want["prompt"].as_str().unwrap(),
            );
            let generated = text[prompt.len()..].trim_end_matches('\n');
            assert!(generated.starts_with("<think>") && generated.ends_with("<|im_end|>"));
            let runs = trained_runs(&tok, &enc.example.input_ids, &enc.example.loss_mask);
            assert_eq!(runs, [generated], "conversation {ci} turn {k}");
        }
        // `data.train_turns = "last"`: one example, the last turn's.
        let last = kiln::data::encode::Encoder {
            last_turn_only: true,
            ..encoder
        }
        .encode(&sample)
        .unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(
            last[0].example.input_ids,
            examples.last().unwrap().example.input_ids
        );
        assert_eq!(
            last[0].example.loss_mask,
            examples.last().unwrap().example.loss_mask
        );
    }
}

/// `data.train_turns = "last"` with a template that renders every turn the same way (Qwen 2.5's):
/// the whole conversation, only its final assistant turn trained.
#[test]
fn train_turns_last_trains_only_the_final_turn() {
    let g = golden();
    let convs = conversations(&g);
    let tmp = tempfile::tempdir().unwrap();
    let tok =
        TokenizerInfo::load(&tokenizer_dir("qwen2.5", tmp.path()), Default::default()).unwrap();
    let (src, origin) = tok.chat_template.clone().unwrap();
    let template = ChatTemplate::compile(&src, &origin).unwrap();
    let all = chat_encoder(&tok, &template);
    let last = kiln::data::encode::Encoder {
        last_turn_only: true,
        ..all
    };
    for (ci, (messages, tools)) in convs.iter().enumerate() {
        let sample = Sample::Chat {
            messages: messages.clone(),
            tools: tools.clone(),
        };
        let (a, l) = (all.encode(&sample).unwrap(), last.encode(&sample).unwrap());
        assert_eq!((a.len(), l.len()), (1, 1));
        let (a, l) = (&a[0].example, &l[0].example);
        let runs_all = trained_runs(&tok, &a.input_ids, &a.loss_mask);
        let runs_last = trained_runs(&tok, &l.input_ids, &l.loss_mask);
        // The conversations end with an assistant turn: the same tokens, and of the trained
        // runs only the final one is left.
        assert_eq!(a.input_ids, l.input_ids, "conversation {ci}");
        assert_eq!(
            runs_last,
            runs_all[runs_all.len() - 1..],
            "conversation {ci}"
        );
    }
}

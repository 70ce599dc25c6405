//! Row formats: what the fields of a row mean. A row becomes a [`Sample`]: a plain prompt and
//! completion, plain text, or a conversation for the chat template.

use serde_json::{Map, Value as Json};

use crate::recipe::{DataFormat, DataSection};

/// A row, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// `prompt` (masked unless `train_on_inputs`) then `completion`. `system` and `user` are the
    /// same row as a conversation, used when a chat template is applied to every format.
    Prompted {
        prompt: String,
        completion: String,
        system: Option<String>,
        user: String,
    },
    /// Plain text: every token is trained.
    Text(String),
    /// Token ids as given, each trained unless its label is -100.
    Tokens {
        input_ids: Vec<u32>,
        loss_mask: Vec<bool>,
    },
    /// Messages (JSON objects with a canonical `role` and `content`) and the row's tools.
    Chat {
        messages: Vec<Json>,
        tools: Option<Json>,
    },
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

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn string_field<'a>(
    obj: &'a Map<String, Json>,
    key: &str,
    required: bool,
    needs: &str,
) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        Some(Json::String(s)) => Ok(Some(s)),
        Some(Json::Null) | None if !required => Ok(None),
        None | Some(Json::Null) => Err(format!("row has no `{key}` field ({needs})")),
        Some(other) => Err(format!(
            "field `{key}` must be a string, found {}",
            json_kind(other)
        )),
    }
}

/// The format of rows whose fields are `keys`, or why it cannot be told.
pub fn detect(row: &Json, cfg: &DataSection) -> Result<DataFormat, String> {
    let f = &cfg.fields;
    let Some(obj) = row.as_object() else {
        return Err(format!(
            "each row must be a JSON object, found {}",
            json_kind(row)
        ));
    };
    let has = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if has(&f.chosen) && has(&f.rejected) {
        return Err(format!(
            "rows with `{}` and `{}` are preference pairs: train on them with training.method = \"dpo\", \"orpo\" or \"simpo\"",
            f.chosen, f.rejected
        ));
    }
    let mut matches = vec![];
    if has(&f.messages) {
        matches.push(DataFormat::Messages);
    }
    if has(&f.conversations) {
        matches.push(DataFormat::Sharegpt);
    }
    if has(&f.instruction) && has(&f.output) {
        matches.push(DataFormat::Alpaca);
    }
    if has(&f.prompt) && has(&f.completion) {
        matches.push(DataFormat::PromptCompletion);
    }
    if has(&f.text) {
        matches.push(DataFormat::Text);
    }
    if has(&f.input_ids) {
        matches.push(DataFormat::Tokens);
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "cannot tell the data format from the fields {keys:?}; set data.format (alpaca: instruction/input/output, messages: [{{role, content}}], sharegpt: conversations [{{from, value}}], prompt_completion, text, tokens: input_ids [+ labels]), and data.fields.* if the columns are named differently"
        )),
        many => {
            let names: Vec<&str> = many.iter().map(|f| f.name()).collect();
            Err(format!(
                "the fields {keys:?} fit several formats ({}); set data.format to the one to train on",
                names.join(", ")
            ))
        }
    }
}

/// An array field of integers.
fn int_array(obj: &Map<String, Json>, key: &str) -> Result<Option<Vec<i64>>, String> {
    let Some(v) = obj.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Json::Array(items) = v else {
        return Err(format!(
            "field `{key}` must be an array of integers, found {}",
            json_kind(v)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64()
                .ok_or_else(|| format!("`{key}[{i}]` must be an integer, found {}", json_kind(x)))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A pre-tokenized row: `input_ids`, and `labels` where -100 marks a token without loss (as in
/// transformers; any other label must equal its token).
fn tokens_row(obj: &Map<String, Json>, f: &crate::recipe::FieldNames) -> Result<Sample, String> {
    let ids = int_array(obj, &f.input_ids)?.ok_or_else(|| {
        format!(
            "row has no `{}` field (format `tokens` reads data.fields.input_ids)",
            f.input_ids
        )
    })?;
    let input_ids = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t).map_err(|_| format!("`{}[{i}]` = {t} is not a token id", f.input_ids))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let loss_mask = match int_array(obj, &f.labels)? {
        None => vec![true; input_ids.len()],
        Some(labels) => {
            if labels.len() != input_ids.len() {
                return Err(format!(
                    "`{}` has {} entries but `{}` has {}; give one label per token",
                    f.labels,
                    labels.len(),
                    f.input_ids,
                    input_ids.len()
                ));
            }
            labels
                .iter()
                .zip(&input_ids)
                .enumerate()
                .map(|(i, (&l, &t))| match l {
                    -100 => Ok(false),
                    l if l == t as i64 => Ok(true),
                    l => Err(format!(
                        "`{}[{i}]` = {l} is neither -100 nor the token {t}; labels here mark which tokens carry loss",
                        f.labels
                    )),
                })
                .collect::<Result<Vec<bool>, _>>()?
        }
    };
    Ok(Sample::Tokens {
        input_ids,
        loss_mask,
    })
}

/// The canonical role (`system`, `user`, `assistant`, `tool`) of a message's role name.
fn canonical_role(name: &str, cfg: &DataSection) -> Result<&'static str, String> {
    if let Some(mapped) = cfg.roles.get(name) {
        return canonical_role_builtin(mapped).ok_or_else(|| {
            format!("data.roles maps `{name}` to `{mapped}`; it must map to system, user, assistant or tool")
        });
    }
    canonical_role_builtin(name).ok_or_else(|| {
        format!(
            "unknown role `{name}`; known roles are system, user/human, assistant/gpt/bot/model, tool/observation, function_call; map others in the recipe, e.g. [data.roles] {name} = \"assistant\""
        )
    })
}

fn canonical_role_builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "system" => "system",
        "user" | "human" => "user",
        "assistant" | "gpt" | "bot" | "model" | "function_call" => "assistant",
        "tool" | "observation" | "function_response" | "ipython" => "tool",
        _ => return None,
    })
}

/// Messages of `list` as `{role, content, ...}` objects with canonical roles.
pub(crate) fn messages(
    list: &Json,
    field: &str,
    role_key: &str,
    content_key: &str,
    cfg: &DataSection,
) -> Result<Vec<Json>, String> {
    let Some(items) = list.as_array() else {
        return Err(format!(
            "field `{field}` must be an array of messages, found {}",
            json_kind(list)
        ));
    };
    if items.is_empty() {
        return Err(format!("empty conversation: `{field}` has no messages"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let n = i + 1;
        let Some(obj) = m.as_object() else {
            return Err(format!(
                "message {n} of `{field}` must be an object with `{role_key}` and `{content_key}`, found {}",
                json_kind(m)
            ));
        };
        let role = match obj.get(role_key) {
            Some(Json::String(r)) => {
                canonical_role(r, cfg).map_err(|e| format!("message {n}: {e}"))?
            }
            Some(other) => {
                return Err(format!(
                    "message {n}: `{role_key}` must be a string, found {}",
                    json_kind(other)
                ))
            }
            None => return Err(format!("message {n} has no `{role_key}` field")),
        };
        let content = match obj.get(content_key) {
            Some(Json::String(s)) => Json::String(s.clone()),
            Some(Json::Null) | None if obj.contains_key("tool_calls") => Json::Null,
            Some(other) => {
                return Err(format!(
                    "message {n}: `{content_key}` must be a string, found {}",
                    json_kind(other)
                ))
            }
            None => return Err(format!("message {n} has no `{content_key}` field")),
        };
        let mut msg = Map::new();
        msg.insert("role".into(), Json::String(role.into()));
        msg.insert("content".into(), content);
        for (k, v) in obj {
            if k != role_key && k != content_key {
                msg.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        out.push(Json::Object(msg));
    }
    Ok(out)
}

/// The row's tool list: a JSON array, or a string holding one (as the glaive/LLaMA-Factory data
/// stores it). An empty list is no tools.
fn tools(obj: &Map<String, Json>, key: &str) -> Result<Option<Json>, String> {
    let v = match obj.get(key) {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::String(s)) => serde_json::from_str::<Json>(s)
            .map_err(|e| format!("field `{key}` is a string but not JSON ({e})"))?,
        Some(v) => v.clone(),
    };
    match v {
        Json::Array(a) if a.is_empty() => Ok(None),
        Json::Array(_) => Ok(Some(v)),
        other => Err(format!(
            "field `{key}` must be a list of tools, found {}",
            json_kind(&other)
        )),
    }
}

/// Reads one row in `format` (already resolved, never `auto`).
pub fn parse(row: &Json, format: DataFormat, cfg: &DataSection) -> Result<Sample, String> {
    let f = &cfg.fields;
    let Some(obj) = row.as_object() else {
        return Err(format!(
            "each row must be a JSON object, found {}",
            json_kind(row)
        ));
    };
    let system = string_field(obj, &f.system, false, "")?.map(String::from);
    match format {
        DataFormat::Alpaca => {
            let needs = format!(
                "format `alpaca` needs `{}` and `{}`, `{}` is optional",
                f.instruction, f.output, f.input
            );
            let instruction = string_field(obj, &f.instruction, true, &needs)?.unwrap_or("");
            let input = string_field(obj, &f.input, false, &needs)?.unwrap_or("");
            let output = string_field(obj, &f.output, true, &needs)?.unwrap_or("");
            let user = if input.trim().is_empty() {
                instruction.to_string()
            } else {
                format!("{instruction}\n\n{input}")
            };
            Ok(Sample::Prompted {
                prompt: alpaca_prompt(instruction, input),
                completion: output.to_string(),
                system,
                user,
            })
        }
        DataFormat::PromptCompletion => {
            let needs = format!(
                "format `prompt_completion` needs `{}` and `{}`",
                f.prompt, f.completion
            );
            // TRL's conversational prompt/completion: two lists of messages.
            if let (Some(p @ Json::Array(_)), Some(c @ Json::Array(_))) =
                (obj.get(&f.prompt), obj.get(&f.completion))
            {
                let mut msgs = messages(p, &f.prompt, "role", "content", cfg)?;
                msgs.extend(messages(c, &f.completion, "role", "content", cfg)?);
                return Ok(Sample::Chat {
                    messages: msgs,
                    tools: tools(obj, &f.tools)?,
                });
            }
            let prompt = string_field(obj, &f.prompt, true, &needs)?.unwrap_or("");
            let completion = string_field(obj, &f.completion, true, &needs)?.unwrap_or("");
            Ok(Sample::Prompted {
                prompt: prompt.to_string(),
                completion: completion.to_string(),
                system,
                user: prompt.to_string(),
            })
        }
        DataFormat::Tokens => tokens_row(obj, f),
        DataFormat::Text => {
            let needs = format!("format `text` reads data.fields.text = `{}`", f.text);
            let text = string_field(obj, &f.text, true, &needs)?.unwrap_or("");
            Ok(Sample::Text(text.to_string()))
        }
        DataFormat::Messages | DataFormat::Sharegpt => {
            let (field, role, content) = if format == DataFormat::Messages {
                (&f.messages, "role", "content")
            } else {
                (&f.conversations, "from", "value")
            };
            let role = f.role.as_deref().unwrap_or(role);
            let content = f.content.as_deref().unwrap_or(content);
            let list = obj.get(field.as_str()).ok_or_else(|| {
                format!(
                    "row has no `{field}` field (format `{}` reads data.fields.{} = `{field}`)",
                    format.name(),
                    if format == DataFormat::Messages {
                        "messages"
                    } else {
                        "conversations"
                    }
                )
            })?;
            let mut msgs = messages(list, field, role, content, cfg)?;
            if let Some(system) = system {
                if msgs[0]["role"] != "system" {
                    msgs.insert(0, serde_json::json!({"role": "system", "content": system}));
                }
            }
            Ok(Sample::Chat {
                messages: msgs,
                tools: tools(obj, &f.tools)?,
            })
        }
        DataFormat::Auto => unreachable!("format resolved before parsing"),
    }
}

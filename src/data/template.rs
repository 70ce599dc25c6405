//! Chat templates: the model's own Jinja template rendered as transformers'
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`, transformers' `tojson`), plus built-ins for bases
//! that have none.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

/// Built-in templates for base models without one, named in `data.chat_template`.
pub const BUILTIN_NAMES: &[&str] = &["alpaca", "chatml", "llama3", "phi3", "mistral", "gemma"];

fn builtin_source(name: &str) -> Option<&'static str> {
    Some(match name {
        // The Stanford Alpaca layout, one Instruction/Response pair per exchange.
        "alpaca" => concat!(
            "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}",
            "{% set rest = messages[1:] %}{% else %}",
            "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' }}",
            "{% set rest = messages %}{% endif %}",
            "{% for message in rest %}",
            "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}",
            "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}",
            "{% else %}{{ raise_exception('the alpaca template knows system, user and assistant messages, not ' + message['role']) }}",
            "{% endif %}{% endfor %}",
            "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
        ),
        "chatml" => concat!(
            "{% for message in messages %}",
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
            "{% endfor %}",
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
        // Llama 3 instruct: header, trimmed content, <|eot_id|>; bos before the first message.
        "llama3" => concat!(
            "{% for message in messages %}",
            "{% if loop.first %}{{ bos_token }}{% endif %}",
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
            "{% endfor %}",
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
        // Phi-3: <|role|>\ncontent<|end|>\n; eos at the end of a finished conversation.
        "phi3" => concat!(
            "{% for message in messages %}",
            "{% if message['role'] in ['system', 'user', 'assistant'] %}",
            "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}",
            "{% endif %}{% endfor %}",
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
        ),
        // Mistral instruct: [INST] user [/INST]assistant</s>; a system prompt goes before the
        // first user message.
        "mistral" => concat!(
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}",
            "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}",
            "{{ bos_token }}",
            "{% for message in rest %}",
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}",
            "{% if message['role'] == 'user' %}",
            "{% if loop.first and system %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}",
            "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}",
            "{% else %}{{ message['content'] + eos_token }}{% endif %}",
            "{% endfor %}"
        ),
        // Gemma: no system role (prepended to the first user turn), assistant is `model`.
        "gemma" => concat!(
            "{{ bos_token }}",
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim + '\\n\\n' %}",
            "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}",
            "{% for message in rest %}",
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}",
            "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}",
            "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}",
            "{% endfor %}",
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
        ),
        _ => return None,
    })
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from, for error messages (`built-in chatml`, `model/chat_template.jinja`).
    pub origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.origin)
    }
}

/// Error text of a failed render: the template's own message for `raise_exception`, else
/// minijinja's with its location.
fn describe(err: &Error) -> String {
    if err.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = err.detail() {
            return detail.to_string();
        }
    }
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

impl ChatTemplate {
    pub fn builtin(name: &str) -> Option<Self> {
        let source = builtin_source(name)?;
        Some(
            Self::compile(source, &format!("built-in `{name}` template"))
                .expect("built-ins compile"),
        )
    }

    /// Compiles a Jinja chat template as transformers does. `{% generation %}` blocks (used by
    /// transformers for assistant masks) render their body.
    pub fn compile(source: &str, origin: &str) -> std::result::Result<Self, String> {
        let source = source
            .replace("{%- generation -%}", "{%- if true -%}")
            .replace("{% generation %}", "{% if true %}")
            .replace("{%- endgeneration -%}", "{%- endif -%}")
            .replace("{% endgeneration %}", "{% endif %}");
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned("chat_template", source)
            .map_err(|e| format!("{origin}: cannot parse the chat template: {}", describe(&e)))?;
        Ok(Self {
            env,
            origin: origin.to_string(),
        })
    }

    /// Renders `messages` (JSON objects with at least `role` and `content`), like
    /// `tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
    ) -> std::result::Result<String, String> {
        let mut ctx = serde_json::Map::new();
        for (k, v) in special_tokens {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        let template = self
            .env
            .get_template("chat_template")
            .expect("added at compile");
        template
            .render(Value::from(minijinja::value::Serde(Json::Object(ctx))))
            .map_err(|e| describe(&e))
    }
}

impl ChatTemplate {
    /// Token ids of `messages` rendered with the generation prompt: what a model continues
    /// from to answer them.
    pub fn prompt_ids(
        &self,
        tok: &crate::tokenizer::TokenizerInfo,
        messages: &[Json],
        tools: Option<&Json>,
    ) -> std::result::Result<Vec<u32>, String> {
        let text = self
            .render(messages, tools, true, &tok.special_tokens)
            .map_err(|e| format!("chat template ({}): {e}", self.origin))?;
        Ok(tok.encode_with_offsets(&text).map_err(|e| e.to_string())?.0)
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, without Jinja's HTML escaping.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => Some(v.as_str().unwrap_or_default().to_string()),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(":").to_string(),
            )
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = PyJson {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from(out))
}

/// Python's `json.dumps` layout.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let escaped = serde_json::to_string(s).expect("strings serialize");
        if !self.ensure_ascii {
            out.push_str(&escaped);
            return;
        }
        for c in escaped.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&n.to_string()),
            Json::String(s) => self.string(s, out),
            Json::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }
}

/// `datetime.now().strftime(format)` in UTC for the directives chat templates use
/// (`%d %b %Y`, `%Y-%m-%d`, ...).
fn strftime_now(format: &str) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(secs, format)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// Formats Unix time `secs` (UTC). Civil date from days since 1970-01-01 (proleptic Gregorian).
pub fn strftime(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime(0, "%d %b %Y %A"), "01 Jan 1970 Thursday");
        // 2024-07-26 12:34:56 UTC
        assert_eq!(
            strftime(1_721_997_296, "%Y-%m-%d %H:%M:%S"),
            "2024-07-26 12:34:56"
        );
        assert_eq!(strftime(951_782_400, "%d %B %Y"), "29 February 2000");
    }

    #[test]
    fn tojson_matches_python() {
        let t = ChatTemplate::compile(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=True) }}",
            "test",
        )
        .unwrap();
        let env = &t.env;
        let out = env
            .get_template("chat_template")
            .unwrap()
            .render(Value::from(minijinja::value::Serde(serde_json::json!({
                "x": {"name": "f", "args": [1, "a<b>"], "e": {}}
            }))))
            .unwrap();
        // json.dumps({"name": "f", "args": [1, "a<b>"], "e": {}}) and with indent=2
        assert_eq!(
            out,
            "{\"name\": \"f\", \"args\": [1, \"a<b>\"], \"e\": {}}|{\n  \"name\": \"f\",\n  \"args\": [\n    1,\n    \"a<b>\"\n  ],\n  \"e\": {}\n}|\"\\u00e9\""
        );
    }

    #[test]
    fn raise_exception_message_is_the_error() {
        let t = ChatTemplate::builtin("mistral").unwrap();
        let msgs = vec![serde_json::json!({"role": "assistant", "content": "hi"})];
        let err = t
            .render(&msgs, None, false, &[("bos_token".into(), "<s>".into())])
            .unwrap_err();
        assert!(err.contains("must alternate"), "{err}");
    }
}

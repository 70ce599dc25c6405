//! GGUF export against llama.cpp (tests/fixtures/gguf_golden.json, made by
//! scripts/golden/make_gguf_golden.py with llama.cpp 0c1e570): tensors byte for byte against
//! convert_hf_to_gguf.py (F32/F16/BF16/Q8_0) and llama-quantize (Q8_0, Q4_0, Q4_K_M, Q6_K,
//! Q2_K, types and bytes), metadata keys with their types, and llama.cpp's greedy generation
//! from kiln's files equal to kiln's own generation from the same files read back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln::export::gguf_types::Preset;
use kiln::gguf::{GgufFile, Value};
use serde_json::Value as Json;

/// The random models of the golden file.
const MODEL_KEYS: [&str; 12] = [
    "k", "tied", "qwen2", "mistral", "phi3", "gemma2", "mixtral", "qwen3", "gemma", "gemma3",
    "phi4mini", "qwen3moe",
];

fn golden() -> Json {
    let text = std::fs::read_to_string("tests/fixtures/gguf_golden.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The random model `key` of the golden file, with the tiny tokenizer, in `tmp`.
fn make_model(key: &str, tmp: &Path) -> PathBuf {
    let g = golden();
    let m = &g["models"][key];
    let config = kiln::io::read_json(Path::new(&format!(
        "tests/fixtures/configs/{}",
        m["config"].as_str().unwrap()
    )))
    .unwrap();
    let dir = tmp.join(key);
    kiln::model::tiny::write_random_model(&dir, &config, m["seed"].as_u64().unwrap(), false)
        .unwrap();
    let tiny = tmp.join("tiny-tokenizer");
    kiln::model::tiny::init_tiny("llama", &tiny, 0).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    if key == "phi3" || key == "phi4mini" {
        // As the golden script: the converter reads tokenizer.json for GPT2Tokenizer (Phi-4).
        let path = dir.join("tokenizer_config.json");
        let mut tc = kiln::io::read_json(&path).unwrap();
        tc["tokenizer_class"] = Json::String("GPT2Tokenizer".into());
        std::fs::write(&path, serde_json::to_string_pretty(&tc).unwrap()).unwrap();
    }
    dir
}

fn export(model: &Path, preset: Preset, out: &Path) {
    export_under(model, preset, out, None)
}

/// [`export`], quantizing under `importance` (an imatrix's values) when given.
fn export_under(
    model: &Path,
    preset: Preset,
    out: &Path,
    importance: Option<std::collections::HashMap<String, Vec<f32>>>,
) {
    let loaded = kiln::infer::load(
        model.to_str().unwrap(),
        None,
        &kiln::infer::InferenceOptions {
            device: "cpu".into(),
            dtype: Some(candle_core::DType::F32),
            quantize: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    let opts = kiln::export::gguf::GgufOptions {
        preset,
        tokenizer_pre: None,
        name: None,
        importance,
        types: None,
    };
    kiln::export::gguf::export_model(&loaded, out, &opts, |_, _| {}).unwrap();
}

fn value_type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "UINT8",
        Value::I8(_) => "INT8",
        Value::U16(_) => "UINT16",
        Value::I16(_) => "INT16",
        Value::U32(_) => "UINT32",
        Value::I32(_) => "INT32",
        Value::F32(_) => "FLOAT32",
        Value::Bool(_) => "BOOL",
        Value::String(_) => "STRING",
        Value::Array(..) => "ARRAY",
        Value::U64(_) => "UINT64",
        Value::I64(_) => "INT64",
        Value::F64(_) => "FLOAT64",
    }
}

/// Python's `json.dumps(list, ensure_ascii=False)` for arrays of strings or integers.
fn python_json(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Value::String(s) => serde_json::to_string(s).unwrap(),
            other => other
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| match other {
                    Value::I32(n) => n.to_string(),
                    _ => panic!("unexpected array item {other:?}"),
                }),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// What gguf-py's GGUFReader reports, as the golden script records it.
fn describe(path: &Path) -> (BTreeMap<String, Json>, BTreeMap<String, Json>) {
    let f = GgufFile::open(path).unwrap();
    let mut meta = BTreeMap::new();
    for (k, v) in &f.metadata {
        let entry = match v {
            Value::Array(t, items) => {
                let elem = value_type_name(&match t {
                    kiln::gguf::ValueType::String => Value::String(String::new()),
                    kiln::gguf::ValueType::I32 => Value::I32(0),
                    kiln::gguf::ValueType::F32 => Value::F32(0.0),
                    _ => Value::U32(0),
                });
                let fnv_text = if *t == kiln::gguf::ValueType::F32 {
                    String::new()
                } else {
                    fnv(python_json(items).as_bytes())
                };
                serde_json::json!({"types": ["ARRAY", elem], "count": items.len(), "fnv": fnv_text})
            }
            other => {
                let value = match other {
                    Value::String(s) => Json::String(s.clone()),
                    Value::Bool(b) => Json::Bool(*b),
                    Value::F32(x) => serde_json::json!(*x as f64),
                    x => serde_json::json!(x.as_u64().unwrap()),
                };
                serde_json::json!({"types": [value_type_name(other)], "value": value})
            }
        };
        meta.insert(k.clone(), entry);
    }
    let mut tensors = BTreeMap::new();
    for t in &f.tensors {
        let bytes = f.tensor_bytes(t).unwrap();
        tensors.insert(
            t.info.name.clone(),
            serde_json::json!({"type": t.info.ggml_type.name(), "dims": t.info.dims, "fnv": fnv(&bytes)}),
        );
    }
    (meta, tensors)
}

/// Keys convert_hf_to_gguf writes that kiln writes differently on purpose: names derived from
/// the directory, and `add_sep_token`, which only BERT-style models use.
const IGNORED_KEYS: &[&str] = &[
    "general.name",
    "general.size_label",
    "tokenizer.ggml.add_sep_token",
];

fn check_metadata(ours: &BTreeMap<String, Json>, theirs: &Json, what: &str) {
    for (k, want) in theirs.as_object().unwrap() {
        if IGNORED_KEYS.contains(&k.as_str()) {
            continue;
        }
        let got = ours
            .get(k)
            .unwrap_or_else(|| panic!("{what}: key `{k}` missing"));
        assert_eq!(got, want, "{what}: key `{k}`");
    }
}

fn check_tensors(ours: &BTreeMap<String, Json>, theirs: &Json, what: &str) {
    let theirs = theirs.as_object().unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        {
            let mut k: Vec<&String> = theirs.keys().collect();
            k.sort();
            k
        },
        "{what}: tensor names"
    );
    let mut mismatched = vec![];
    for (name, want) in theirs {
        let got = &ours[name];
        assert_eq!(got["type"], want["type"], "{what}: type of `{name}`");
        assert_eq!(got["dims"], want["dims"], "{what}: dims of `{name}`");
        if got["fnv"] != want["fnv"] {
            mismatched.push(name.clone());
        }
    }
    assert!(
        mismatched.is_empty(),
        "{what}: bytes differ in {mismatched:?}"
    );
}

fn preset(name: &str) -> Preset {
    <Preset as clap::ValueEnum>::from_str(name, true).unwrap()
}

/// kiln's greedy text (12 tokens) for the golden prompt from `base` with a PEFT adapter, dense
/// f32, without control tokens (llama-completion does not print them).
fn kiln_greedy_with_adapter(base: &str, adapter: &str) -> String {
    let g = golden();
    let text = common::generated_text(&[
        "--model",
        base,
        "--adapter",
        adapter,
        "--quantize",
        "none",
        "--dtype",
        "f32",
        "--max-new-tokens",
        "12",
        "--prompt",
        g["prompt"].as_str().unwrap(),
    ]);
    let control = regex::Regex::new(r"<\|[a-z_]+\|>").unwrap();
    control.replace_all(&text, "").into_owned()
}

#[test]
fn float_and_q8_0_exports_equal_convert_hf_to_gguf() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    for key in MODEL_KEYS {
        let model = make_model(key, tmp.path());
        for outtype in ["f32", "f16", "bf16", "q8_0"] {
            let out = tmp.path().join(format!("{key}-{outtype}.gguf"));
            export(&model, preset(outtype), &out);
            let (meta, tensors) = describe(&out);
            let want = &g["models"][key]["convert"][outtype];
            let what = format!("{key} {outtype}");
            check_metadata(&meta, &want["metadata"], &what);
            check_tensors(&tensors, &want["tensors"], &what);
        }
    }
}

#[test]
fn quantized_exports_equal_llama_quantize() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    for key in MODEL_KEYS {
        let model = make_model(key, tmp.path());
        for q in ["q8_0", "q4_0", "q4_k_m", "q6_k", "q2_k"] {
            let out = tmp.path().join(format!("{key}-{q}.gguf"));
            export(&model, preset(q), &out);
            let (meta, tensors) = describe(&out);
            let want = &g["models"][key]["quantize"][q];
            let what = format!("{key} {q}");
            assert_eq!(
                meta["general.file_type"], want["metadata"]["general.file_type"],
                "{what}: file type"
            );
            check_tensors(&tensors, &want["tensors"], &what);
        }
    }
}

#[test]
fn llama_cpp_generates_what_kiln_reads_back() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let prompt = g["prompt"].as_str().unwrap();
    for key in MODEL_KEYS {
        let model = make_model(key, tmp.path());
        for (p, hex) in g["models"][key]["llama_cpp_greedy"].as_object().unwrap() {
            let out = tmp.path().join(format!("{key}-{p}-gen.gguf"));
            export(&model, preset(p), &out);
            let theirs = common::llama_cpp_text(hex.as_str().unwrap());
            let ours = common::generated_text(&[
                "--model",
                out.to_str().unwrap(),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "12",
            ]);
            let ours = ours.as_str();
            if p != "f32" && p != "f16" {
                // llama.cpp multiplies quantized weights with activations rounded to 8 bits
                // (q8_0 / q8_K), kiln with f32 activations. A random model's top logits are
                // close, so greedy paths part after a while. At 4 bits and below, both
                // programs can leave the F32 path from the first token (the Mistral fixture
                // does), so those files are checked by their bytes (equal to llama-quantize's,
                // above) and not here. Q8_0 stays close.
                if p != "q8_0" {
                    continue;
                }
                let common = ours
                    .chars()
                    .zip(theirs.chars())
                    .take_while(|(a, b)| a == b)
                    .count();
                assert!(
                    common * 3 >= theirs.chars().count(),
                    "{key} {p}: {ours:?} vs {theirs:?}"
                );
            } else {
                assert_eq!(ours, theirs, "{key} {p}");
            }
        }
    }
}

const BASE: &str = "tests/fixtures/llama_tiny_a";
const PEFT: &str = "tests/fixtures/peft_adapter_a";

#[test]
fn adapter_export_equals_convert_lora_to_gguf() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let adapter = kiln::model::peft::read_adapter(Path::new(PEFT)).unwrap();
    let cfg = kiln::model::ModelConfig::from_file(&Path::new(BASE).join("config.json")).unwrap();
    for outtype in ["f32", "q8_0"] {
        let out = tmp.path().join(format!("lora-{outtype}.gguf"));
        let ty = kiln::export::gguf::adapter_type(outtype).unwrap();
        kiln::export::gguf::export_adapter(&adapter, &cfg, &out, ty, None).unwrap();
        let (meta, tensors) = describe(&out);
        let want = &g["adapter"][format!("convert_lora_{outtype}")];
        check_metadata(&meta, &want["metadata"], outtype);
        check_tensors(&tensors, &want["tensors"], outtype);
    }
}

#[test]
fn llama_cpp_with_kiln_adapter_generates_what_kiln_generates() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let rslora = tmp.path().join("rslora");
    std::fs::create_dir_all(&rslora).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(Path::new(PEFT).join(f), rslora.join(f)).unwrap();
    }
    let mut cfg = kiln::io::read_json(&rslora.join("adapter_config.json")).unwrap();
    cfg["use_rslora"] = Json::Bool(true);
    std::fs::write(rslora.join("adapter_config.json"), cfg.to_string()).unwrap();
    for (name, adapter) in [("plain", PathBuf::from(PEFT)), ("rslora", rslora)] {
        let ours = kiln_greedy_with_adapter(BASE, adapter.to_str().unwrap());
        let hex = g["adapter"][format!("llama_cpp_greedy_{name}")]
            .as_str()
            .unwrap();
        assert_eq!(ours, common::llama_cpp_text(hex), "{name}");
    }
}

/// `kiln export gguf` with an adapter and held-out data: the fidelity line, read back by kiln.
fn export_with_report(out: &Path, quant: &str) -> (String, f64, f64) {
    let stdout = common::kiln_stdout(&[
        "export",
        "gguf",
        "--model",
        BASE,
        "--adapter",
        PEFT,
        "-o",
        out.to_str().unwrap(),
        "--quant",
        quant,
        "--eval-data",
        "tests/fixtures/data/eval_text.jsonl",
    ]);
    println!("{quant}: {stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("fidelity on 95 held-out tokens"))
        .expect(&stdout)
        .to_string();
    let num = |after: &str| -> f64 {
        line.split(after)
            .nth(1)
            .unwrap()
            .split([' ', ','])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (line.clone(), num("GGUF "), num("mean KL "))
}

#[test]
fn export_reports_fidelity_and_writes_a_modelfile() {
    let tmp = tempfile::tempdir().unwrap();
    // F32 of the adapter merged into the NF4 weights it was trained against: the trained model.
    let (line, _, kl) = export_with_report(&tmp.path().join("f32/model.gguf"), "f32");
    assert!(kl < 1e-6, "{line}");
    let (line, ppl, kl) = export_with_report(&tmp.path().join("q4/model.gguf"), "q4_k_m");
    assert!(kl > 1e-5 && kl < 0.5, "{line}");
    let trained: f64 = line
        .split("trained (adapter on NF4 base) ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((ppl / trained - 1.0).abs() < 0.2, "{line}");
    let modelfile = std::fs::read_to_string(tmp.path().join("q4/Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model.gguf\n"), "{modelfile}");
    assert!(modelfile.contains("PARAMETER stop "), "{modelfile}");
}

#[test]
fn modelfile_has_the_chat_format_and_every_end_of_turn_token() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_model("tied", tmp.path());
    let out = tmp.path().join("out/tied.gguf");
    common::kiln_stdout(&[
        "export",
        "gguf",
        "--model",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let modelfile = std::fs::read_to_string(tmp.path().join("out/Modelfile")).unwrap();
    for want in [
        "FROM ./tied.gguf\n",
        "# chat format: llama3\n",
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
        "PARAMETER stop \"<|eot_id|>\"\n",
        "PARAMETER stop \"<|end_of_text|>\"\n",
    ] {
        assert!(modelfile.contains(want), "missing {want:?} in\n{modelfile}");
    }
}

mod common;

/// Texts that exercise pre-tokenizers: contractions, digits, spaces, newlines, unicode.
const TOKENIZER_TEXTS: &[&str] = &[
    "Hello world! I'm here, you're there; we'll see 12345 and 3.14159.",
    "  two leading spaces\n\n\tand a tab,   three spaces  ",
    "Unicode: naïve café, 日本語のテキスト, emoji 🦙🚀 and Ελληνικά.",
    "<|user|>\nWho are you?<|end|>\n<|assistant|>\nI am Vicuna.<|end|>",
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
    "def f(x):\n    return x ** 2  # square\n",
];

/// The tokenizer rebuilt from GGUF metadata encodes as llama.cpp does and decodes as the original
/// does: byte-level BPE (Llama 3, Qwen 2.5) and SentencePiece BPE with byte fallback (Phi-3).
#[test]
fn tokenizer_survives_the_round_trip_through_gguf_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, model) in [
        ("llama3-instruct", "gpt2"),
        ("qwen2.5", "gpt2"),
        ("phi3", "llama"),
    ] {
        let dir = common::tokenizer_dir(name, tmp.path());
        let info = kiln::tokenizer::TokenizerInfo::load(&dir, Default::default()).unwrap();
        let n = info.tokenizer.get_vocab_size(true);
        let mut meta = kiln::tokenizer::vocab::export_metadata(&dir, &info, n, None).unwrap();
        // llama.cpp recognises Phi-3 (whitespace stripped after its special tokens) by name.
        meta.push(("general.name".into(), Value::String(name.into())));
        let path = tmp.path().join(format!("{name}.gguf"));
        kiln::gguf::write(&path, &meta, &[], |_| unreachable!()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(
            file.require_str("tokenizer.ggml.model").unwrap(),
            model,
            "{name}"
        );
        let back = kiln::tokenizer::vocab::tokenizer_from_gguf(&file).unwrap();
        assert_eq!(back.eos_id, info.eos_id, "{name}");
        assert_eq!(
            back.chat_template.is_some(),
            info.chat_template.is_some(),
            "{name}"
        );
        // The rebuild gives llama-tokenize's ids on kiln's own GGUF file (the golden file),
        // Phi-3's documented departures from transformers 5 included.
        let theirs = &golden()["tokenizers"][name];
        for (i, text) in TOKENIZER_TEXTS.iter().enumerate() {
            let want: Vec<u32> = serde_json::from_value(theirs[i].clone()).unwrap();
            assert_eq!(back.encode(text, true).unwrap(), want, "{name}: {text:?}");
            assert_eq!(
                back.decode(&want).unwrap(),
                info.decode(&want).unwrap(),
                "{name}: {text:?}"
            );
        }
    }
}

#[test]
fn inspect_shows_a_gguf_and_corrupt_files_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_model("tied", tmp.path());
    let out = tmp.path().join("tied.gguf");
    export(&model, Preset::Q8_0, &out);
    let i = kiln::export::inspect::inspect(&out).unwrap();
    assert!(i.kind.starts_with("GGUF"));
    assert_eq!(i.metadata["general.architecture"], "llama");
    assert_eq!(i.metadata["llama.block_count"], 2);
    assert!(i
        .tensors
        .iter()
        .any(|t| t.name == "token_embd.weight" && t.dtype == "Q8_0"));
    assert!(
        !i.tensors.iter().any(|t| t.name == "output.weight"),
        "tied: no output.weight"
    );

    let bytes = std::fs::read(&out).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "magic",
            [b"GGML".as_slice(), &bytes[4..]].concat(),
            "not a GGUF file",
        ),
        (
            "version",
            [&bytes[..4], &9u32.to_le_bytes()[..], &bytes[8..]].concat(),
            "version 9",
        ),
        ("header", bytes[..40].to_vec(), "truncated"),
        (
            "data",
            bytes[..bytes.len() - 100].to_vec(),
            "truncated: the tensors need",
        ),
    ];
    for (what, data, want) in cases {
        let p = tmp.path().join(format!("bad-{what}.gguf"));
        std::fs::write(&p, data).unwrap();
        let err = GgufFile::open(&p).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("bad-"), "{what}: {err}");
    }
    // A tensor offset that is not where llama.cpp expects it.
    let f = GgufFile::open(&out).unwrap();
    let last = f.tensors.last().unwrap();
    let name = last.info.name.as_bytes();
    let pos = bytes.windows(name.len()).rposition(|w| w == name).unwrap();
    let offset_at = pos + name.len() + 4 + 8 * last.info.dims.len() + 4;
    let mut moved = bytes.clone();
    moved[offset_at..offset_at + 8].copy_from_slice(&(last.offset + 32).to_le_bytes());
    let p = tmp.path().join("bad-offset.gguf");
    std::fs::write(&p, moved).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("bad tensor offsets"), "{err}");
}

/// `kiln eval` on a GGUF file gives the loss of the model it was exported from (F32), and
/// `--model FILE.gguf` works in generate (tested above) and eval alike.
#[test]
fn eval_on_a_gguf_file_equals_eval_on_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    // Every architecture read back: un-permuted Q/K, biases, fused projections and Phi-3's
    // window, Gemma 2's norms (stored +1), soft caps and local layers, Qwen 3's q/k norms.
    for key in [
        "k", "qwen2", "phi3", "gemma2", "mixtral", "qwen3", "gemma", "gemma3", "phi4mini",
        "qwen3moe",
    ] {
        let model = make_model(key, tmp.path());
        let out = tmp.path().join(format!("{key}.gguf"));
        export(&model, Preset::F32, &out);
        let (a, b) = (common::eval_loss(&model), common::eval_loss(&out));
        assert!((a - b).abs() < 1e-5 * a, "{key}: {a} vs {b}");
    }
}

/// llama.cpp tokenizes with kiln's exported vocabularies as the Hugging Face tokenizer does
/// (ids from llama-tokenize in the golden file): byte-level BPE with the detected pre-tokenizer
/// (Llama 3 `llama-bpe`, Qwen 2.5 `qwen2`) and SentencePiece BPE with merge-rank scores (Phi-3).
/// Phi-3 has two known differences, both where transformers 5 (whose tokenization kiln trains
/// with) departs from sentencepiece, which llama.cpp follows: after special tokens llama.cpp
/// starts the next piece with `▁` (`<|user|>\nWho` → `▁Who`, transformers 5: `Who`), and a
/// leading run of spaces is one piece in llama.cpp (`▁▁`), two in transformers 5 (`▁`, `▁two`).
#[test]
fn llama_cpp_tokenizes_kiln_vocabularies_as_hugging_face_does() {
    let g = golden();
    let t = &g["tokenizers"];
    let texts: Vec<&str> = t["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(texts, TOKENIZER_TEXTS);
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama3-instruct", "qwen2.5", "phi3"] {
        let info = kiln::tokenizer::TokenizerInfo::load(
            &common::tokenizer_dir(name, tmp.path()),
            Default::default(),
        )
        .unwrap();
        for (i, text) in texts.iter().enumerate() {
            let theirs: Vec<u32> = serde_json::from_value(t[name][i].clone()).unwrap();
            let ours = info.encode(text, true).unwrap();
            if name == "phi3" && (i == 1 || i == 3) {
                assert_ne!(
                    ours, theirs,
                    "the documented Phi-3 difference is gone: {text:?}"
                );
                continue;
            }
            assert_eq!(ours, theirs, "{name}: {text:?}");
        }
    }
}

/// The other families' adapters: the same file as convert_lora_to_gguf.py (no lora_b
/// permutation for qwen2, qwen3, phi3 and the Gemmas; phi3's on the fused attn_qkv), and
/// llama.cpp generates with Qwen 2's, Mixtral's, Qwen 3's and Gemma's what kiln generates with
/// the PEFT adapter.
#[test]
fn family_adapters_equal_convert_lora_and_generate_as_kiln() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    for family in [
        "qwen2", "phi3", "gemma2", "mixtral", "qwen3", "gemma", "gemma3", "phi4mini", "qwen3moe",
    ] {
        let base = format!("tests/fixtures/{family}_tiny");
        let peft = format!("tests/fixtures/peft_adapter_{family}");
        let adapter = kiln::model::peft::read_adapter(Path::new(&peft)).unwrap();
        let cfg =
            kiln::model::ModelConfig::from_file(&Path::new(&base).join("config.json")).unwrap();
        let out = tmp.path().join(format!("{family}-lora.gguf"));
        kiln::export::gguf::export_adapter(&adapter, &cfg, &out, kiln::gguf::GgmlType::F32, None)
            .unwrap();
        let (meta, tensors) = describe(&out);
        let want = &g["adapter"][format!("{family}_convert_lora_f32")];
        check_metadata(&meta, &want["metadata"], family);
        check_tensors(&tensors, &want["tensors"], family);

        let Some(hex) = g["adapter"][format!("{family}_llama_cpp_greedy")].as_str() else {
            continue;
        };
        // llama-completion prints each piece as a C string: a NUL byte (a token of the tiny
        // byte-level vocabulary) prints as nothing.
        let ours = kiln_greedy_with_adapter(&base, &peft).replace('\0', "");
        assert_eq!(ours, common::llama_cpp_text(hex), "{family}");
    }
}

/// Real depths (16 to 42 layers, tests/fixtures/gguf_depth_golden.json, made by
/// scripts/golden/make_gguf_depth_golden.py): every tensor of kiln's Q4_K_M, Q6_K and Q2_K exports has
/// llama-quantize's type and bytes. llama-quantize counts `attn_v` and `ffn_down` in block
/// order (blk.9 before blk.10), not in the file's; tiny models have too few layers to tell.
#[test]
fn k_quant_mixes_pick_llama_quantizes_layers_at_real_depths() {
    let text = std::fs::read_to_string("tests/fixtures/gguf_depth_golden.json").unwrap();
    let g: Json = serde_json::from_str(&text).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tiny = tmp.path().join("tiny-tokenizer");
    kiln::model::tiny::init_tiny("llama", &tiny, 0).unwrap();
    let mut depths = vec![];
    for (name, m) in g["models"].as_object().unwrap() {
        let config = kiln::io::read_json(Path::new(&format!(
            "tests/fixtures/configs/depth/{name}.json"
        )))
        .unwrap();
        assert_eq!(config["num_hidden_layers"], m["layers"], "{name}");
        depths.push(m["layers"].as_u64().unwrap());
        let dir = tmp.path().join(name);
        kiln::model::tiny::write_random_model(&dir, &config, g["seed"].as_u64().unwrap(), false)
            .unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
        }
        for (q, want) in m["quantize"].as_object().unwrap() {
            let out = tmp.path().join(format!("{name}-{q}.gguf"));
            export(&dir, preset(q), &out);
            let f = GgufFile::open(&out).unwrap();
            let want = want.as_object().unwrap();
            assert_eq!(f.tensors.len(), want.len(), "{name} {q}: tensor count");
            let mut wrong = vec![];
            for t in &f.tensors {
                let ours = format!(
                    "{}:{}",
                    t.info.ggml_type.name(),
                    fnv(&f.tensor_bytes(t).unwrap())
                );
                if want.get(&t.info.name).and_then(Json::as_str) != Some(ours.as_str()) {
                    wrong.push(format!(
                        "{} kiln {ours} llama-quantize {}",
                        t.info.name, want[&t.info.name]
                    ));
                }
            }
            assert!(
                wrong.is_empty(),
                "{name} ({} layers) {q}: {} tensors differ:\n{}",
                m["layers"],
                wrong.len(),
                wrong.join("\n")
            );
            std::fs::remove_file(&out).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    depths.sort();
    assert_eq!(depths, [16, 22, 26, 28, 30, 32, 40, 42]);
}

/// The Modelfile renders in Ollama what the model was trained on
/// (tests/fixtures/modelfile_golden.json, made by scripts/golden/make_modelfile_golden.py: Go's
/// text/template with Ollama's chat semantics against transformers' apply_chat_template, for
/// real templates, with and without a system message, multi-turn). kiln still writes the verified
/// TEMPLATE and SYSTEM for each, and every conversation the model's template accepts rendered
/// equal, Qwen 2.5's default system prompt included (Gemma 2 refuses system messages).
#[test]
fn modelfile_templates_render_in_ollama_as_transformers_does() {
    let text = std::fs::read_to_string("tests/fixtures/modelfile_golden.json").unwrap();
    let g: Json = serde_json::from_str(&text).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let between = |text: &str, start: &str| -> String {
        match text.split_once(start) {
            Some((_, rest)) => rest.split_once("\"\"\"").unwrap().0.to_string(),
            None => String::new(),
        }
    };
    for (name, entry) in g["templates"].as_object().unwrap() {
        let dir =
            common::tokenizer_dir(entry["tokenizer"].as_str().unwrap(), &tmp.path().join(name));
        let mut tc = kiln::io::read_json(&dir.join("tokenizer_config.json")).unwrap();
        if let Some(file) = entry["template_file"].as_str() {
            let template =
                std::fs::read_to_string(Path::new("tests/fixtures/templates").join(file)).unwrap();
            tc["chat_template"] = Json::String(template);
        }
        for (k, v) in entry["special"].as_object().unwrap() {
            tc[k] = v.clone();
        }
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string(&tc).unwrap(),
        )
        .unwrap();
        let tok = kiln::tokenizer::TokenizerInfo::load(&dir, Default::default()).unwrap();
        let modelfile = kiln::export::gguf::modelfile("./model.gguf", &tok, &[], 4096);
        assert_eq!(
            between(&modelfile, "TEMPLATE \"\"\""),
            entry["template"].as_str().unwrap(),
            "{name}: TEMPLATE changed since it was verified\n{modelfile}"
        );
        assert_eq!(
            between(&modelfile, "SYSTEM \"\"\""),
            entry["system"].as_str().unwrap(),
            "{name}: SYSTEM changed since it was verified\n{modelfile}"
        );
        for (i, (ollama, hf)) in entry["ollama"]
            .as_array()
            .unwrap()
            .iter()
            .zip(entry["transformers"].as_array().unwrap())
            .enumerate()
        {
            if hf.as_str().unwrap().starts_with("error:") {
                assert_eq!(
                    name, "gemma2",
                    "{name}: transformers refused conversation {i}"
                );
                continue;
            }
            assert_eq!(
                ollama, hf,
                "{name}: conversation {i} renders otherwise in Ollama"
            );
        }
    }
}

/// An export from a kiln run's adapter measures fidelity on the run's data without being told
/// (RUN/recipe.toml beside RUN/adapter), and a large KL gets a warning naming closer types.
#[test]
fn export_from_a_run_reports_fidelity_unasked() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("adapter")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            Path::new("tests/fixtures/peft_adapter_a").join(f),
            run.join("adapter").join(f),
        )
        .unwrap();
    }
    std::fs::write(
        run.join("recipe.toml"),
        format!(
            "[model]\npath = \"tests/fixtures/llama_tiny_a\"\n[data]\npath = \"tests/fixtures/data/eval_text.jsonl\"\n[output]\ndir = \"{}\"\n",
            run.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("q4/model.gguf");
    let o = common::kiln(&[
        "export",
        "gguf",
        "--model",
        "tests/fixtures/llama_tiny_a",
        "--adapter",
        run.join("adapter").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quant",
        "q4_0",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("fidelity on "), "{stdout}");
    assert!(common::stderr(&o).contains("the adapter's run data"));

    // `--calibrate` with no file calibrates on the same run's rows.
    let cal = tmp.path().join("cal/model.gguf");
    let o = common::kiln(&[
        "export",
        "gguf",
        "--model",
        "tests/fixtures/llama_tiny_a",
        "--adapter",
        run.join("adapter").to_str().unwrap(),
        "-o",
        cal.to_str().unwrap(),
        "--quant",
        "q4_k_m",
        "--calibrate",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("calibration: "),
        "{}",
        common::stderr(&o)
    );
    assert!(tmp.path().join("cal/model.imatrix.gguf").is_file());

    let report = kiln::export::merge::MergeReport {
        reference: "trained".into(),
        candidate: "GGUF".into(),
        target_tokens: 100,
        trained_perplexity: 10.0,
        merged_perplexity: 11.2,
        mean_kl: 0.09,
    };
    let advice = kiln::export::gguf::fidelity_advice(&report, "Q4_K_M").unwrap();
    assert!(
        advice.contains("q6_k") && advice.contains("+12.0%"),
        "{advice}"
    );
    let close = kiln::export::merge::MergeReport {
        mean_kl: 0.005,
        ..report.clone()
    };
    assert!(kiln::export::gguf::fidelity_advice(&close, "Q6_K").is_none());
    // A float file's KL comes from the weights merged into, not from the file type.
    let float = kiln::export::gguf::fidelity_advice(&report, "F32").unwrap();
    assert!(
        float.contains("--into nf4") && !float.contains("q6_k"),
        "{float}"
    );
}

/// Calibrated export (tests/fixtures/gguf_calibrated_golden.json, made by
/// scripts/golden/make_calibrated_golden.py with llama.cpp 0c1e570): under the importance matrices kiln
/// measured (tests/fixtures/gguf_calibrated/), kiln's Q4_K_M, Q6_K and Q2_K equal
/// `llama-quantize --imatrix` of kiln's F32 file byte for byte — Q2_K, Q3_K, Q4_K and Q6_K on
/// rows of 256, and on rows 256 does not divide the Q4_0, Q5_0 and Q8_0 they fall back to.
#[test]
fn calibrated_exports_equal_llama_quantize_with_the_imatrix() {
    let text = std::fs::read_to_string("tests/fixtures/gguf_calibrated_golden.json").unwrap();
    let g: Json = serde_json::from_str(&text).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for key in ["k", "tied"] {
        let model = make_model(key, tmp.path());
        let imatrix = format!("tests/fixtures/gguf_calibrated/{key}.imatrix.gguf");
        let importance = kiln::infer::imatrix::read(Path::new(&imatrix)).unwrap();
        for (preset, name) in [
            (Preset::Q4KM, "Q4_K_M"),
            (Preset::Q6K, "Q6_K"),
            (Preset::Q2K, "Q2_K"),
        ] {
            let out = tmp.path().join(format!("{key}-{name}.gguf"));
            export_under(&model, preset, &out, Some(importance.clone()));
            let (_, tensors) = describe(&out);
            let want = g["models"][key][name].as_object().unwrap();
            assert_eq!(tensors.len(), want.len(), "{key} {name}: tensor count");
            for (tensor, w) in want {
                let got = &tensors[tensor];
                assert_eq!(got["type"], w["type"], "{key} {name} {tensor}: type");
                assert_eq!(got["fnv"], w["fnv"], "{key} {name} {tensor}: bytes");
            }
        }
    }
}

/// `export gguf --calibrate DATA` measures the importance matrix on the rows, writes it beside
/// the file, and quantizes under it: the same bytes as `--imatrix` with the written matrix,
/// other bytes than the uncalibrated export; presets that use no matrix are refused.
#[test]
fn calibrate_measures_writes_and_uses_the_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_model("tied", tmp.path());
    let m = model.to_str().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let export = |out: &str, extra: &[&str]| {
        // One general.name, which otherwise follows the file name.
        let mut args = vec![
            "export", "gguf", "--model", m, "-o", out, "--quant", "q4_k_m", "--name", "tied",
        ];
        args.extend(extra);
        args.push("--no-modelfile");
        let o = common::kiln(&args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read(out).unwrap()
    };
    let calibrated = export(
        &path("cal.gguf"),
        &[
            "--calibrate",
            "datasets/alpaca_tiny.jsonl",
            "--calibrate-rows",
            "8",
        ],
    );
    let written = path("cal.imatrix.gguf");
    assert!(
        Path::new(&written).is_file(),
        "no matrix written beside the file"
    );
    let again = export(&path("again.gguf"), &["--imatrix", &written]);
    assert!(
        calibrated == again,
        "--calibrate and --imatrix with its matrix differ"
    );
    let plain = export(&path("plain.gguf"), &[]);
    assert!(calibrated != plain, "calibration changed nothing");
    let o = common::kiln(&[
        "export",
        "gguf",
        "--model",
        m,
        "-o",
        &path("q8.gguf"),
        "--quant",
        "q8_0",
        "--imatrix",
        &written,
    ]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("q4_k_m, q6_k, q2_k and auto"),
        "{}",
        common::stderr(&o)
    );
}

/// `export gguf --quant auto` measures every weight on the calibration rows and chooses types
/// within Q4_K_M's size: no larger than the Q4_K_M file, a mix of types, and a file kiln reads
/// back and evaluates.
#[test]
fn auto_types_fit_the_q4_k_m_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_model("k", tmp.path());
    let m = model.to_str().unwrap();
    let out = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    for (file, quant) in [("q4km.gguf", "q4_k_m"), ("auto.gguf", "auto")] {
        let o = common::kiln(&[
            "export",
            "gguf",
            "--model",
            m,
            "-o",
            &out(file),
            "--quant",
            quant,
            "--calibrate",
            "datasets/alpaca_tiny.jsonl",
            "--calibrate-rows",
            "4",
            "--no-modelfile",
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        if quant == "auto" {
            assert!(
                common::stderr(&o).contains("weights measured"),
                "{}",
                common::stderr(&o)
            );
        }
    }
    let size = |f: &str| std::fs::metadata(out(f)).unwrap().len();
    assert!(
        size("auto.gguf") <= size("q4km.gguf") + 4096,
        "{} vs {}",
        size("auto.gguf"),
        size("q4km.gguf")
    );
    let (_, tensors) = describe(Path::new(&out("auto.gguf")));
    let types: std::collections::BTreeSet<String> = tensors
        .values()
        .map(|t| t["type"].as_str().unwrap().to_string())
        .filter(|t| t != "F32")
        .collect();
    assert!(types.len() >= 2, "one type everywhere: {types:?}");
    let o = common::kiln(&[
        "eval",
        "--model",
        &out("auto.gguf"),
        "--data",
        "datasets/alpaca_tiny.jsonl",
        "--limit",
        "2",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
}

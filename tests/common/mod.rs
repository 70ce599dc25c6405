//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Tensor;

/// Runs the kiln binary (with backtraces on: error messages must stay clean anyway); `KILN_BIN`
/// names another build of it (test binaries carried to the GPU machine use that).
pub fn kiln(args: &[&str]) -> Output {
    let bin = std::env::var("KILN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kiln").into());
    Command::new(bin)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run kiln")
}

/// Runs kiln, asserts that it succeeded, and returns its stdout.
pub fn kiln_stdout(args: &[&str]) -> String {
    let o = kiln(args);
    assert!(o.status.success(), "kiln {args:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `kiln eval --json` mean loss of `model` (dense f32) on tests/fixtures/data/eval_text.jsonl.
pub fn eval_loss(model: &Path) -> f64 {
    let out = kiln_stdout(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "tests/fixtures/data/eval_text.jsonl",
        "--dtype",
        "f32",
        "--json",
    ]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["mean_loss"]
        .as_f64()
        .unwrap()
}

/// The text of `kiln generate ARGS --json`.
pub fn generated_text(args: &[&str]) -> String {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = kiln_stdout(&all);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Copies files `names` of directory `from` into directory `to` (created if missing).
pub fn copy_files(from: &Path, names: &[&str], to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in names {
        std::fs::copy(from.join(name), to.join(name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", from.join(name).display()));
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A clear error: exit code 2, a message starting `error: ` that contains every needle, and no
/// panic or backtrace.
pub fn expect_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code for:\n{err}");
    assert!(
        err.starts_with("error: "),
        "message must start with `error: `:\n{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace") && !err.contains("   0: "),
        "no panic or backtrace:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }
}

/// max |t|
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b|
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// A model directory holding the fixture tokenizer `name` (tokenizer.json unpacked).
pub fn tokenizer_dir(name: &str, into: &Path) -> PathBuf {
    let dir = into.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new("tests/fixtures").join("tokenizers").join(name);
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let gz = src.join("tokenizer.json.gz");
    if gz.exists() {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        std::fs::write(dir.join("tokenizer.json"), text).unwrap();
    }
    dir
}

/// All values of `t` as f32, flattened.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The model's LoRA variables (A and B of each adapter), each moved by 0.02: B starts at zero,
/// and moved, every gradient is non-trivial.
pub fn lora_params_moved(model: &kiln::model::Decoder) -> Vec<candle_core::Var> {
    let params = model.lora_vars();
    for v in &params {
        v.set(&(v.as_tensor() + 0.02).unwrap()).unwrap();
    }
    params
}

/// llama-completion's generated text, recorded as hex bytes by the golden scripts, as a (lossy)
/// string: without the blank line it ends with, and without the " [end of text]" that marks an
/// end-of-sequence token it generated.
pub fn llama_cpp_text(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let bytes = bytes.strip_suffix(b"\n\n").unwrap_or(&bytes);
    let bytes = bytes.strip_suffix(b" [end of text]\n").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

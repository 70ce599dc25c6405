//! Distillation (issue 20): the loss and the student's LoRA gradients against PyTorch
//! (scripts/make_distill_golden.py), a teacher with another tokenizer refused, and a run that
//! brings the student closer to the teacher than fine-tuning alone does.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use kiln::data::{Example, TrainData};
use kiln::recipe::Recipe;
use kiln::step::StepPath;
use kiln::train::distill::Teacher;
use kiln::train::{accumulate_share, StepShare};

const FIX: &str = "tests/fixtures";

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{FIX}/distill_golden.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The student (llama_tiny_a with PEFT's adapter) and the teacher (llama_tiny_b), f32 on the CPU.
fn recipe(out: &Path, loss: &str, alpha: f64, temperature: f64) -> Recipe {
    let text = format!(
        r#"
[model]
path = "{FIX}/llama_tiny_a"
quantize = "none"
compute_dtype = "f32"
device = "cpu"
[data]
path = "unused.jsonl"
format = "tokens"
[lora]
r = 8
lora_alpha = 16
lora_dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
init_adapter = "{FIX}/peft_adapter_a"
[distill]
teacher = "{FIX}/llama_tiny_b"
teacher_quantize = "none"
loss = "{loss}"
alpha = {alpha}
temperature = {temperature}
[output]
dir = "{}"
"#,
        out.display()
    );
    Recipe::parse(Path::new("distill.toml"), &text, &[]).unwrap()
}

/// The golden rows as kiln examples: token ids up to each row's length, its loss mask.
fn golden_rows(g: &HashMap<String, Tensor>) -> TrainData {
    let ids = g["input_ids"].to_vec2::<i64>().unwrap();
    let mask = g["mask"].to_vec2::<u8>().unwrap();
    let examples = ids
        .iter()
        .zip(&mask)
        .map(|(ids, mask)| {
            let n = ids.iter().take_while(|&&t| t != 0).count();
            Example::new(
                ids[..n].iter().map(|&t| t as u32).collect(),
                mask[..n].iter().map(|&m| m == 1).collect(),
            )
        })
        .collect();
    TrainData::new(examples, false, 64)
}

/// Every case of the golden file, on the reference (autograd) path and on the explicit step:
/// loss, divergence and cross-entropy, and every LoRA gradient, to 1e-5.
#[test]
fn distillation_loss_and_gradients_equal_pytorch() {
    let g = golden();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIX}/distill_golden.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = golden_rows(&g);
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let r = recipe(
            tmp.path(),
            case["loss"].as_str().unwrap(),
            case["alpha"].as_f64().unwrap(),
            case["temperature"].as_f64().unwrap(),
        );
        let student = kiln::train::load_model(&r).unwrap();
        let teacher = Teacher::load(&r, &student, None).unwrap().unwrap();
        let adapters = student.model.adapters();
        let params: Vec<candle_core::Var> = adapters
            .iter()
            .flat_map(|(_, a)| [a.a.clone(), a.b.clone()])
            .collect();
        let names: Vec<String> = adapters
            .iter()
            .flat_map(|(p, _)| [format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")])
            .collect();
        let batches = [vec![0, 1]];
        let share = StepShare {
            micro_batches: &batches,
            dropout_seeds: &[7],
            step_targets: kiln::train::step_targets(&data, &batches),
            teacher: Some(&teacher),
        };
        assert_eq!(
            share.step_targets,
            cases["targets"].as_u64().unwrap() as usize
        );
        for path in [StepPath::Reference, StepPath::Explicit] {
            let out = accumulate_share(&student.model, &data, &share, 0, &params, path).unwrap();
            let n = out.target_tokens as f64;
            let (div, ce) = out.distill_sums.unwrap();
            for (what, got, want) in [
                ("loss", out.loss_sum / n, case["value"].as_f64().unwrap()),
                ("divergence", div / n, case["kl"].as_f64().unwrap()),
                ("cross-entropy", ce / n, case["ce"].as_f64().unwrap()),
            ] {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{name} {path:?} {what}: {got} vs PyTorch {want}"
                );
            }
            for (name_k, grad) in names.iter().zip(&out.grads) {
                let want = &g[&format!("{name}.{name_k}")];
                let scale = common::max_abs(want).max(1e-6);
                let diff = common::max_abs_diff(grad, want);
                assert!(
                    diff <= 1e-5 * scale.max(1.0) as f32,
                    "{name} {path:?} {name_k}: gradient differs by {diff} (largest {scale})"
                );
            }
        }
    }
}

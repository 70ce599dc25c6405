//! Distillation: the loss and the student's LoRA gradients against PyTorch
//! (scripts/golden/make_distill_golden.py), a teacher with another tokenizer refused, and a run that
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

/// The recipe of `recipe` training on the Alpaca rows (12 held out), from a fresh adapter, at
/// lr 3e-3 with four rows a step.
fn alpaca_recipe(out: &Path, alpha: f64, temperature: f64, steps: usize) -> Recipe {
    let mut r = recipe(out, "forward_kl", alpha, temperature);
    r.lora.init_adapter = None;
    r.data = Recipe::parse(
        Path::new("data.toml"),
        "[model]\npath='x'\n[data]\npath='datasets/alpaca_tiny.jsonl'\nformat='alpaca'\nmax_seq_len=96\nval_split=12\n[output]\ndir='x'\n",
        &[],
    )
    .unwrap()
    .data;
    r.training.max_steps = steps;
    r.training.micro_batch_size = 4;
    r.training.learning_rate = 3e-3;
    r.training.lr_scheduler = kiln::recipe::Scheduler::Constant;
    r
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
        let teacher = Teacher::load(&r, &student, &data).unwrap().unwrap();
        let adapters = student.model.adapters();
        let params = student.model.lora_vars();
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
            preference: None,
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

/// A teacher whose tokenizer gives a token another id is refused before its weights load, and
/// the message names the token and both ids.
#[test]
fn a_teacher_with_another_tokenizer_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = copy_fixture("llama_tiny_b", &tmp.path().join("teacher"));
    let path = teacher.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = ("§", "¨");
    assert_eq!(
        (vocab[a].as_u64(), vocab[b].as_u64()),
        (Some(100), Some(101))
    );
    vocab.insert(a.into(), 101.into());
    vocab.insert(b.into(), 100.into());
    std::fs::write(&path, tok.to_string()).unwrap();
    let mut r = recipe(&tmp.path().join("out"), "forward_kl", 0.5, 2.0);
    r.distill.as_mut().unwrap().teacher = Some(teacher.display().to_string());
    let student = kiln::train::load_model(&r).unwrap();
    let err = Teacher::load_model(&r, &student)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("`§` is id 101, not 100") && err.contains(&teacher.display().to_string()),
        "{err}"
    );
}

/// A copy of fixture model `name` in `to` (to edit).
fn copy_fixture(name: &str, to: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(Path::new(FIX).join(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    to.to_path_buf()
}

/// The lines of a run's metrics.jsonl.
fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A metrics line's (kl, ce, loss).
fn loss_parts(m: &serde_json::Value) -> (f64, f64, f64) {
    let get = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"));
    (get("kl"), get("ce"), get("loss"))
}

/// Mean KL(teacher ‖ student) at temperature 1 over `rows`, the student carrying `adapter`.
fn held_out_kl(out: &Path, adapter: Option<&Path>, rows: &[Example]) -> f64 {
    let mut r = recipe(out, "forward_kl", 1.0, 1.0);
    r.lora.init_adapter = adapter.map(Path::to_path_buf);
    let student = kiln::train::load_model(&r).unwrap();
    let data = TrainData::new(rows.to_vec(), false, 128);
    let teacher = Teacher::load(&r, &student, &data).unwrap().unwrap();
    let batches: Vec<Vec<usize>> = (0..rows.len()).map(|i| vec![i]).collect();
    let share = StepShare {
        micro_batches: &batches,
        dropout_seeds: &vec![0; batches.len()],
        step_targets: kiln::train::step_targets(&data, &batches),
        teacher: Some(&teacher),
        preference: None,
    };
    let params = student.model.lora_vars();
    let out = accumulate_share(&student.model, &data, &share, 0, &params, StepPath::Auto).unwrap();
    out.distill_sums.unwrap().0 / out.target_tokens as f64
}

/// From the same start and data, training with the teacher lowers KL(teacher ‖ student) on
/// held-out rows more than fine-tuning on the data alone; metrics.jsonl logs both parts.
#[test]
fn distillation_brings_the_student_closer_to_the_teacher_than_fine_tuning() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, distill: bool| {
        let out = tmp.path().join(name);
        let mut r = alpaca_recipe(&out, 0.5, 1.0, 30);
        if !distill {
            r.distill = None;
        }
        let summary = kiln::train::train(&r, true, None).unwrap();
        (r, out, summary)
    };
    let (r, sft_out, _) = run("sft", false);
    let (_, kd_out, kd) = run("distill", true);
    let student = kiln::train::load_model(&r).unwrap();
    let rows = kiln::data::load_dataset(&r.data, &student.tokenizer, r.training.seed)
        .unwrap()
        .val;
    assert_eq!(rows.len(), 12);
    let start = held_out_kl(tmp.path(), None, &rows);
    let sft = held_out_kl(tmp.path(), Some(&sft_out.join("adapter")), &rows);
    let distilled = held_out_kl(tmp.path(), Some(&kd_out.join("adapter")), &rows);
    println!("held-out KL(teacher ‖ student): start {start:.4}, fine-tuned {sft:.4}, distilled {distilled:.4}");
    assert!(
        distilled < sft && distilled < 0.9 * start,
        "start {start}, fine-tuned {sft}, distilled {distilled}"
    );
    // metrics.jsonl: the two parts, weighed into the loss as the recipe says.
    let (kl, ce, loss) = loss_parts(&metric_lines(&kd_out)[0]);
    assert!(
        (0.5 * kl + 0.5 * ce - loss).abs() < 1e-4 * loss,
        "{kl} {ce} {loss}"
    );
    assert!(kd.metrics.last().unwrap().kl.unwrap() < kl);
}

/// A cache of the teacher's log-probabilities with k = the whole vocabulary gives the live
/// teacher's loss and gradients; a cache of other data is refused.
#[test]
fn a_full_cache_equals_the_live_teacher_and_other_data_is_refused() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let data = golden_rows(&g);
    let mut r = recipe(tmp.path(), "jsd", 0.6, 1.5);
    let student = kiln::train::load_model(&r).unwrap();
    let live = Teacher::load(&r, &student, &data).unwrap().unwrap();
    let cache = tmp.path().join("cache");
    let written = kiln::train::distill_cache::write(
        &cache,
        &live,
        &data,
        &kiln::train::distill_cache::CacheSettings {
            teacher_name: "llama_tiny_b",
            top_k: 512,
            micro_batch: 1,
            pad_id: 0,
        },
        &|_| {},
    )
    .unwrap();
    assert_eq!(
        (written.targets, written.top_k),
        (kiln::train::step_targets(&data, &[vec![0, 1]]), 512)
    );
    r.distill.as_mut().unwrap().cache = Some(cache.clone());
    let cached = Teacher::load(&r, &student, &data).unwrap().unwrap();
    let params = student.model.lora_vars();
    let batches = [vec![0, 1]];
    let run = |teacher: &Teacher| {
        let share = StepShare {
            micro_batches: &batches,
            dropout_seeds: &[1],
            step_targets: kiln::train::step_targets(&data, &batches),
            teacher: Some(teacher),
            preference: None,
        };
        accumulate_share(&student.model, &data, &share, 0, &params, StepPath::Auto).unwrap()
    };
    let (a, b) = (run(&live), run(&cached));
    assert!(
        (a.loss_sum - b.loss_sum).abs() < 1e-5 * a.loss_sum.abs(),
        "{} vs {}",
        a.loss_sum,
        b.loss_sum
    );
    for (x, y) in a.grads.iter().zip(&b.grads) {
        let d = common::max_abs_diff(x, y);
        assert!(
            d <= 1e-5 * common::max_abs(x).max(1e-3),
            "gradients differ by {d}"
        );
    }
    // Other data (one row fewer): refused, naming the command that fixes it.
    let fewer = TrainData::new(data.examples[..1].to_vec(), false, 64);
    let err = Teacher::load(&r, &student, &fewer)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("written for other training data") && err.contains("kiln distill cache"),
        "{err}"
    );
}

/// The command line end to end, and what a top-k cache costs: `kiln distill cache` at several k,
/// `kiln train` reading each, and the held-out KL(teacher ‖ student) each run reaches beside the
/// live teacher's (printed; BENCHMARKS.md records the table). k = the vocabulary trains exactly
/// as the live teacher does.
#[test]
fn top_k_caches_from_the_command_line_against_the_live_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe_file = tmp.path().join("distill.toml");
    let out = |name: &str| tmp.path().join(name);
    let live = alpaca_recipe(&out("live"), 0.5, 2.0, 20);
    std::fs::write(&recipe_file, toml::to_string(&live).unwrap()).unwrap();
    let recipe = recipe_file.to_str().unwrap();
    let losses = |dir: &Path| -> Vec<f64> {
        metric_lines(dir)
            .iter()
            .map(|m| m["loss"].as_f64().unwrap())
            .collect()
    };
    let o = common::kiln(&["train", recipe, "--quiet"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let r = Recipe::load(&recipe_file, &[]).unwrap();
    let student = kiln::train::load_model(&r).unwrap();
    let rows = kiln::data::load_dataset(&r.data, &student.tokenizer, r.training.seed)
        .unwrap()
        .val;
    let kl = |dir: &Path| held_out_kl(tmp.path(), Some(&dir.join("adapter")), &rows);
    let live = kl(&out("live"));
    let start = held_out_kl(tmp.path(), None, &rows);
    println!(
        "held-out KL(teacher ‖ student) after 20 steps: start {start:.4}, live teacher {live:.4}"
    );
    for k in [1, 8, 64, 512] {
        let cache = out(&format!("cache-{k}"));
        let o = common::kiln(&[
            "distill",
            "cache",
            recipe,
            "--top-k",
            &k.to_string(),
            "--out",
            cache.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let run = out(&format!("run-{k}"));
        let o = common::kiln(&[
            "train",
            recipe,
            "--quiet",
            "--set",
            &format!("distill.cache=\"{}\"", cache.display()),
            "--set",
            &format!("output.dir=\"{}\"", run.display()),
        ]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let reached = kl(&run);
        println!("  top-{k} cache: {reached:.4}");
        assert!(reached < 0.8 * start, "top-{k}: {reached} from {start}");
        if k >= 64 {
            assert!(
                (reached - live).abs() < 0.01 * live,
                "top-{k}: {reached} vs live {live}"
            );
        }
        if k == 512 {
            // The whole vocabulary: the live run's losses.
            for (a, b) in losses(&run).iter().zip(losses(&out("live"))) {
                assert!((a - b).abs() < 1e-4 * b, "{a} vs live {b}");
            }
        }
    }
}

/// `kiln train recipes/distill-tiny.toml` on the CPU into `out` for `steps` steps, with `extra`
/// arguments and, if given, a `KILN_FAULT`.
fn train_distill_tiny(
    cache: &Path,
    out: &Path,
    steps: usize,
    fault: Option<&str>,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["train", "recipes/distill-tiny.toml", "--device", "cpu"])
        .args(["--set", &format!("output.dir=\"{}\"", out.display())])
        .args(["--set", &format!("training.max_steps={steps}")])
        .args(extra)
        .env("KILN_CACHE", cache)
        .env_remove("KILN_FAULT");
    if let Some(f) = fault {
        cmd.env("KILN_FAULT", f);
    }
    cmd.output().unwrap()
}

/// A run's adapter file, byte for byte.
fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// The shipped distillation recipe runs as the README says, and logs both parts.
#[test]
fn the_shipped_distillation_recipe_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train_distill_tiny(tmp.path(), &out, 3, None, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("distilling from tests/fixtures/llama_tiny_a"));
    let (kl, ce, loss) = loss_parts(metric_lines(&out).last().unwrap());
    // alpha 0.5, temperature 2: loss = 0.5 · 4 · kl + 0.5 · ce.
    assert!(
        (2.0 * kl + 0.5 * ce - loss).abs() < 1e-4 * loss,
        "{kl} {ce} {loss}"
    );
}

/// A distillation run killed mid-way resumes from its checkpoint to the adapter an
/// uninterrupted run writes, byte for byte (the teacher is loaded again; nothing of it is
/// saved), with the kl and ce of every step.
#[test]
fn a_killed_distillation_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let save = ["--set", "training.save_steps=3"];
    let train = |out: &Path, kill: Option<&str>, extra: &[&str]| {
        train_distill_tiny(tmp.path(), out, 6, kill, &[&save[..], extra].concat())
    };
    let whole = tmp.path().join("whole");
    let o = train(&whole, None, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cut = tmp.path().join("cut");
    let o = train(&cut, Some("kill-step:5"), &[]);
    assert!(!o.status.success() && !cut.join("adapter").exists());
    let o = train(&cut, None, &["--resume"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        adapter_bytes(&cut),
        adapter_bytes(&whole),
        "the resumed adapter differs"
    );
    let parts = |run: &Path| metric_lines(run).iter().map(loss_parts).collect::<Vec<_>>();
    assert_eq!(parts(&cut), parts(&whole));
}

/// A draft made of a model's own first layers (`model.layers`, `--draft-layers`): it computes
/// what the model with `num_hidden_layers = N` in config.json computes; greedy speculative
/// decoding with it gives the model's own text; an adapter trained on it (with the whole model
/// as teacher) applies to it; a count past the model's layers is refused.
#[test]
fn a_draft_of_the_models_first_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let cut = copy_fixture("llama_tiny_a", &tmp.path().join("two-layers"));
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 2.into();
    std::fs::write(cut.join("config.json"), config.to_string()).unwrap();
    let opts = |layers| kiln::infer::InferenceOptions {
        device: "cpu".into(),
        dtype: Some(candle_core::DType::F32),
        quantize: Some(false),
        layers,
        ..Default::default()
    };
    let model = format!("{FIX}/llama_tiny_a");
    let first_two = kiln::infer::load(&model, None, &opts(Some(2))).unwrap();
    let reference = kiln::infer::load(cut.to_str().unwrap(), None, &opts(None)).unwrap();
    assert_eq!(first_two.model.layers.len(), 2);
    let ids = Tensor::new(&[[5u32, 77, 300, 12, 9, 411]], &Device::Cpu).unwrap();
    let (a, b) = (
        first_two.model.forward(&ids).unwrap(),
        reference.model.forward(&ids).unwrap(),
    );
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    assert!(kiln::infer::load(&model, None, &opts(Some(4)))
        .err()
        .expect("refused")
        .to_string()
        .contains("has 3"));

    // Distil the 2-layer draft from the whole model (2 steps), then decode with it.
    let run = tmp.path().join("draft");
    let recipe = tmp.path().join("draft.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"{model}\"\nlayers = 2\nquantize = \"none\"\ndevice = \"cpu\"\n[data]\npath = \"datasets/alpaca_tiny.jsonl\"\nmax_seq_len = 96\n[lora]\ntarget_modules = \"all-linear\"\n[training]\nmax_steps = 2\n[distill]\nteacher = \"{model}\"\nteacher_quantize = \"none\"\nalpha = 1.0\n[output]\ndir = \"{}\"\n",
            run.display()
        ),
    )
    .unwrap();
    let o = common::kiln(&["train", recipe.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "Give three tips",
            "--max-new-tokens",
            "24",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = common::kiln(&args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            out["text"].as_str().unwrap().to_string(),
            common::stderr(&o),
        )
    };
    let (plain, _) = generate(&[]);
    let adapter = run.join("adapter");
    let (drafted, err) = generate(&[
        "--draft",
        &model,
        "--draft-layers",
        "2",
        "--draft-adapter",
        adapter.to_str().unwrap(),
    ]);
    assert_eq!(drafted, plain);
    assert!(err.contains("proposed tokens accepted"), "{err}");
}

/// Distillation on two ranks (`--gpus 2 --device cpu`: two processes summing over TCP) trains
/// exactly as one process accumulating both micro-batches: each rank runs its own teacher, and
/// the divergence and cross-entropy parts are summed with the loss.
#[test]
fn distillation_on_two_ranks_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let o = train_distill_tiny(tmp.path(), out, 3, None, extra);
        assert!(o.status.success(), "{}", common::stderr(&o));
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run(&one, &["--set", "training.gradient_accumulation_steps=2"]);
    let two_ranks = [
        "--gpus",
        "2",
        "--set",
        "training.gradient_accumulation_steps=1",
    ];
    run(&two, &two_ranks);
    assert_eq!(
        adapter_bytes(&one),
        adapter_bytes(&two),
        "2 ranks x 1 differ from 1 x 2"
    );
    let parts = |run: &Path| metric_lines(run).iter().map(loss_parts).collect::<Vec<_>>();
    let (a, b) = (parts(&one), parts(&two));
    for ((k1, c1, l1), (k2, c2, l2)) in a.iter().zip(&b) {
        // The sums travel as f32 through the all-reduce.
        for (x, y) in [(k1, k2), (c1, c2), (l1, l2)] {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "{a:?} vs {b:?}");
        }
    }
}

/// `teacher_adapter`: the teacher computes its base with the adapter applied, without dropout
/// (frozen; the adapter's config here asks for 0.5), by the training step's layer code: its
/// hidden states equal the reference forward of the same model and adapter.
#[test]
fn a_teacher_with_an_adapter_computes_the_adapted_model_without_dropout() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let files = ["adapter_config.json", "adapter_model.safetensors"];
    common::copy_files(&Path::new(FIX).join("peft_adapter_a"), &files, &adapter);
    let cfg = adapter.join("adapter_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["lora_dropout"] = 0.5.into();
    std::fs::write(&cfg, json.to_string()).unwrap();

    let g = golden();
    let data = golden_rows(&g);
    let mut r = recipe(tmp.path(), "forward_kl", 0.5, 2.0);
    let section = r.distill.as_mut().unwrap();
    section.teacher = Some(format!("{FIX}/llama_tiny_a"));
    section.teacher_adapter = Some(adapter.display().to_string());
    let student = kiln::train::load_model(&r).unwrap();
    let teacher = Teacher::load(&r, &student, &data).unwrap().unwrap();
    let hidden = |t: &Teacher| match t.rows(&data, &[0, 1], 0, None).unwrap() {
        kiln::ops::distill::TeacherRows::Hidden { hidden, .. } => hidden,
        _ => panic!("a live teacher gives hidden states"),
    };
    let (first, again) = (hidden(&teacher), hidden(&teacher));
    assert_eq!(common::max_abs_diff(&first, &again), 0.0, "no dropout");

    let batch = data.batch(&[0, 1], 0, &Device::Cpu).unwrap();
    let dense = kiln::infer::InferenceOptions {
        device: "cpu".into(),
        dtype: Some(candle_core::DType::F32),
        quantize: Some(false),
        ..Default::default()
    };
    let forward = |adapter: Option<&Path>| {
        let m = kiln::infer::load(&format!("{FIX}/llama_tiny_a"), adapter, &dense).unwrap();
        m.model
            .forward_hidden_with(&batch.inputs, batch.layout.as_ref(), None)
            .unwrap()
            .flatten_to(candle_core::D::Minus2)
            .unwrap()
    };
    let want = forward(Some(&adapter));
    let d = common::max_abs_diff(&first, &want) / common::max_abs(&want);
    assert!(d < 1e-5, "teacher vs the adapted model: {d}");
    let base = forward(None);
    assert!(common::max_abs_diff(&base, &want) / common::max_abs(&want) > 1e-3);
}

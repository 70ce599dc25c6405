//! What a run leaves for people: TensorBoard event files that TensorBoard's own reader reads as
//! `metrics.jsonl` says (tests/fixtures/tensorboard, read by tensorboard 2.21's
//! `EventAccumulator` in scripts/golden/make_tensorboard_golden.py), a real run's events equal to
//! its metrics, a resumed run's curves continuous, and `kiln report`'s page.

use std::path::Path;

use kiln::report::tensorboard::{self, EventWriter};
use serde_json::Value;

mod common;

const FIX: &str = "tests/fixtures/tensorboard";

fn metrics_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every `(step, key, value)` number of metrics lines but the step, in file order.
fn numbers(lines: &[Value]) -> Vec<(u64, String, f32)> {
    lines
        .iter()
        .flat_map(|l| {
            let step = l["step"].as_u64().unwrap();
            l.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(move |(k, v)| v.as_f64().map(|x| (step, k.clone(), x as f32)))
        })
        .collect()
}

/// The committed event file is what kiln writes for the committed metrics (bytes), and
/// TensorBoard's `EventAccumulator` read from it every scalar at every step of `metrics.jsonl`.
#[test]
fn tensorboard_reads_kilns_event_file_as_the_metrics_say() {
    let lines = metrics_lines(&Path::new(FIX).join("metrics.jsonl"));
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path(), 1e9).unwrap();
    for l in &lines {
        w.metrics(l, 1e9).unwrap();
    }
    w.text(0, "recipe", "```toml\nr = 8\n```", 1e9).unwrap();
    let committed = Path::new(FIX).join("events.out.tfevents.1000000000.kiln");
    let ours = std::fs::read(w.path()).unwrap();
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&committed, &ours).unwrap();
    }
    assert_eq!(
        ours,
        std::fs::read(&committed).unwrap(),
        "kiln's event bytes changed"
    );

    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIX).join("accumulated.json")).unwrap(),
    )
    .unwrap();
    let mut read: Vec<(u64, String, f32)> = vec![];
    for (tag, points) in golden["scalars"].as_object().unwrap() {
        for p in points.as_array().unwrap() {
            read.push((
                p[0].as_u64().unwrap(),
                tag.clone(),
                p[1].as_f64().unwrap() as f32,
            ));
        }
    }
    let mut want = numbers(&lines);
    want.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
    read.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
    assert_eq!(
        read, want,
        "TensorBoard's reading differs from metrics.jsonl"
    );
    assert_eq!(golden["texts"]["recipe"][0][1], "```toml\nr = 8\n```");
}

/// A real run's event file holds exactly its metrics.jsonl (every number, every step), the
/// recipe and its samples; a resumed run's file holds one continuous history with no step twice.
#[test]
fn a_run_and_its_resumption_log_one_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let set = format!("output.dir=\"{}\"", run.display());
    let base = [
        "train",
        "recipes/tiny.toml",
        "-q",
        "--set",
        &set,
        "--set",
        "training.max_steps=8",
        "--set",
        "training.save_steps=4",
        "--set",
        "training.eval_steps=4",
        "--set",
        "data.val_split=0.1",
        "--set",
        "training.sample_prompts=[\"Hello\"]",
    ];
    // The first run is killed as step 7 begins, after the checkpoint of step 4: its metrics and
    // events hold steps 1-6.
    let killed = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(base)
        .env("KILN_FAULT", "kill-step:7")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    let check = |what: &str| {
        let files = tensorboard::event_files(&run.join("tensorboard"));
        assert_eq!(files.len(), 1, "{what}: {files:?}");
        let events = tensorboard::read(&files[0]).unwrap();
        let lines = metrics_lines(&run.join("metrics.jsonl"));
        assert_eq!(events.scalars, numbers(&lines), "{what}");
        assert!(events.texts.iter().any(|t| t.1 == "recipe"), "{what}");
        assert!(events.texts.iter().any(|t| t.1 == "samples"), "{what}");
        let steps: Vec<u64> = lines
            .iter()
            .filter(|l| l.get("lr").is_some())
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(
            steps,
            (1..=steps.len() as u64).collect::<Vec<_>>(),
            "{what}: {steps:?}"
        );
        events
    };
    let first = check("the killed run");
    assert!(first.scalars.iter().any(|s| s.0 == 6) && !first.scalars.iter().any(|s| s.0 == 7));
    // Resumed from step 4: steps 5 and 6 are trained again, and the history is one curve, each
    // step once.
    let mut resumed = base.to_vec();
    resumed.extend(["--set", "training.resume=true"]);
    common::kiln_stdout(&resumed);
    let second = check("the resumed run");
    assert!(second.scalars.iter().any(|s| s.0 == 8));
}

/// `kiln report` of two runs: one page, one curve per metric and run with every logged point,
/// the runs' settings, their samples, and nothing that fetches from a network.
#[test]
fn the_report_is_one_self_contained_page() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = vec![];
    for (name, recipe) in [
        ("sft", "recipes/tiny.toml"),
        ("dpo", "recipes/dpo-tiny.toml"),
    ] {
        let run = tmp.path().join(name);
        let set = format!("output.dir=\"{}\"", run.display());
        common::kiln_stdout(&[
            "train",
            recipe,
            "-q",
            "--set",
            &set,
            "--set",
            "training.max_steps=6",
        ]);
        assert!(
            run.join("report.html").exists(),
            "kiln train writes the run's report"
        );
        dirs.push(run);
    }
    let out = tmp.path().join("both.html");
    common::kiln_stdout(&[
        "report",
        dirs[0].to_str().unwrap(),
        dirs[1].to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&out).unwrap();
    for (dir, name) in dirs.iter().zip(["sft", "dpo"]) {
        let lines = metrics_lines(&dir.join("metrics.jsonl"));
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for (_, k, _) in numbers(&lines) {
            if k != "epoch" && k != "elapsed_s" {
                *counts.entry(k).or_default() += 1;
            }
        }
        for (metric, n) in counts {
            let curve = format!("data-metric=\"{metric}\" data-run=\"{name}\" data-points=\"{n}\"");
            assert_eq!(
                html.matches(&curve).count(),
                1,
                "{name} {metric}: {n} points"
            );
        }
    }
    assert!(html.contains("rewards/margins") && html.contains("<td>dpo</td>"));
    assert!(html.contains("Content-Security-Policy") && html.contains("default-src 'none'"));
    for fetch in [
        "http:", "https:", "<script", "<link", "<img", "@import", "url(",
    ] {
        assert!(!html.contains(fetch), "the page would fetch: {fetch}");
    }
}

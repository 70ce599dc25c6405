//! Data-parallel training, proved on the CPU: ranks are `kiln train` processes (started by
//! `--gpus N`, or by hand with torchrun's variables) that sum their gradients through the TCP
//! collective, in rank order. The same arithmetic runs on GPUs with NCCL in place of TCP
//! (scripts/gpu/gpu_multi.sh checks that on two H200s).

mod common;
use common::stderr;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn kiln(cache: &Path, out: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args([
        "train",
        "recipes/tiny.toml",
        "-q",
        "--device",
        "cpu",
        "--set",
    ])
    .arg(format!("output.dir=\"{}\"", out.display()))
    .args([
        "--set",
        "training.max_steps=6",
        "--set",
        "training.save_steps=2",
        // Two micro-batches a step unless a test says otherwise (later --set wins).
        "--set",
        "training.gradient_accumulation_steps=2",
    ])
    .args(args)
    .env("KILN_CACHE", cache)
    .env_remove("KILN_FAULT");
    cmd
}

fn run(cache: &Path, out: &Path, args: &[&str]) -> Output {
    kiln(cache, out, args).output().expect("run kiln")
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

fn metrics(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?[key].as_f64())
        .collect()
}

/// Waits for `child` at most `limit`; a run still going then is killed and the test fails.
fn wait_at_most(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Two (and four) ranks of one micro-batch each sum to exactly what one process accumulating two
/// (four) micro-batches computes: the same examples, dropout seeds and target count, and the sum
/// (g₀ + g₁) in the same order — so the adapters are bit-identical. With two micro-batches a
/// rank, the order differs ((g₀ + g₁) + (g₂ + g₃) against ((g₀ + g₁) + g₂) + g₃): equal to f32
/// rounding. Only rank 0 writes.
#[test]
fn ranks_train_exactly_as_one_process_with_the_same_step_batch() {
    let tmp = tempfile::tempdir().unwrap();
    // N ranks of one micro-batch each against one process accumulating N.
    let ranks_of_one = |n: usize| {
        let (one, ranks) = (
            tmp.path().join(format!("1x{n}")),
            tmp.path().join(format!("{n}x1")),
        );
        let accumulation = format!("training.gradient_accumulation_steps={n}");
        let o = run(tmp.path(), &one, &["--set", &accumulation]);
        assert!(o.status.success(), "{}", stderr(&o));
        let gpus = n.to_string();
        let set = [
            "--gpus",
            &gpus,
            "--set",
            "training.gradient_accumulation_steps=1",
        ];
        let o = run(tmp.path(), &ranks, &set);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            adapter(&one),
            adapter(&ranks),
            "{n} ranks x 1 differ from 1 x {n}"
        );
        assert_eq!(metrics(&one, "loss"), metrics(&ranks, "loss"));
        assert_eq!(metrics(&one, "tokens"), metrics(&ranks, "tokens"));
        (one, ranks)
    };
    let (one, two) = ranks_of_one(2);
    let mut written: Vec<String> = std::fs::read_dir(&two)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "adapter",
            "checkpoint-2",
            "checkpoint-4",
            "metrics.jsonl",
            "recipe.toml",
            "report.html",
            "tensorboard"
        ]
    );
    // Four ranks: the rank-order sum is the one process's order again.
    let (four, _) = ranks_of_one(4);

    // 2 x 2 against 1 x 4 (the effective batch is printed).
    let two_by_two = tmp.path().join("two_by_two");
    let cmd = kiln(tmp.path(), &two_by_two, &["--gpus", "2"]);
    let args: Vec<_> = cmd
        .get_args()
        .filter(|a| *a != "-q")
        .map(|a| a.to_owned())
        .collect();
    let o = Command::new(cmd.get_program())
        .args(args)
        .env("KILN_CACHE", tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("batch: 4 sequences x 2 micro-batches x 2 ranks = 16 sequences a step"),
        "{}",
        stderr(&o)
    );
    // Both ranks hold the same adapter at every checkpoint (checked by the ranks themselves).
    for step in [2, 4] {
        assert!(
            stderr(&o).contains(&format!("checkpoint-{step}: adapter "))
                && stderr(&o).contains("the same on all 2 ranks"),
            "{}",
            stderr(&o)
        );
    }
    let (a, b) = (metrics(&four, "loss"), metrics(&two_by_two, "loss"));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() / x.abs() < 1e-6, "losses {a:?} vs {b:?}");
    }
    let (a, b) = (
        metrics(&four, "grad_norm"),
        metrics(&two_by_two, "grad_norm"),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() / x.abs() < 1e-5,
            "gradient norms {a:?} vs {b:?}"
        );
    }
    // The comparison can fail: another split of the data trains otherwise.
    let other = metrics(&one, "loss");
    assert!(a.iter().zip(&other).any(|(x, y)| (x - y).abs() > 1e-3));
}

/// Preference training across ranks: two ranks of one micro-batch of pairs each give exactly
/// one process's two micro-batches (each pair's loss over the step's pairs), for DPO with its
/// reference precomputed once per rank and for KTO, whose KL estimate is a micro-batch's own.
#[test]
fn preference_ranks_train_exactly_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    for method in ["dpo", "kto"] {
        let train = |out: &Path, extra: &[&str]| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
            cmd.args(["train", "recipes/dpo-tiny.toml", "-q", "--device", "cpu"])
                .args(["--set", &format!("output.dir=\"{}\"", out.display())])
                .args(["--set", &format!("training.method=\"{method}\"")])
                .args([
                    "--set",
                    "training.max_steps=4",
                    "--set",
                    "training.eval_steps=0",
                ])
                .args([
                    "--set",
                    "data.val_split=0",
                    "--set",
                    "training.micro_batch_size=2",
                ])
                .args(["--set", "preference.precompute_ref_log_probs=true"])
                .args(extra)
                .env("KILN_CACHE", tmp.path())
                .env_remove("KILN_FAULT");
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "{method}: {}", stderr(&o));
        };
        let (one, two) = (
            tmp.path().join(format!("{method}-1x2")),
            tmp.path().join(format!("{method}-2x1")),
        );
        train(&one, &["--set", "training.gradient_accumulation_steps=2"]);
        train(&two, &["--gpus", "2"]);
        assert_eq!(
            adapter(&one),
            adapter(&two),
            "{method}: 2 ranks differ from 1 x 2"
        );
        // Rank 0 alone writes TensorBoard's events: one file, holding metrics.jsonl's steps.
        let files = kiln::report::tensorboard::event_files(&two.join("tensorboard"));
        assert_eq!(files.len(), 1, "{method}: {files:?}");
        let events = kiln::report::tensorboard::read(&files[0]).unwrap();
        let losses: Vec<f32> = events
            .scalars
            .iter()
            .filter(|s| s.1 == "loss")
            .map(|s| s.2)
            .collect();
        let want: Vec<f32> = metrics(&two, "loss").iter().map(|&x| x as f32).collect();
        assert_eq!(losses, want, "{method}");
        // The sums cross the collective in f32: equal to its rounding.
        for key in ["loss", "rewards/margins", "rewards/chosen"] {
            let (a, b) = (metrics(&one, key), metrics(&two, key));
            assert_eq!(a.len(), 4, "{method}: {key}");
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                    "{method}: {key} {a:?} vs {b:?}"
                );
            }
        }
    }
}

/// Ranks started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT; kiln's rendezvous on MASTER_PORT + 1) train as `--gpus 2` does. A rank whose data
/// differs from rank 0's is refused by name.
#[test]
fn ranks_started_with_torchrun_variables_find_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let launched = tmp.path().join("launched");
    let o = run(
        tmp.path(),
        &launched,
        &[
            "--gpus",
            "2",
            "--set",
            "training.gradient_accumulation_steps=1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let start = |out: &Path, rank: usize, port: u16, extra: &[&str]| -> Child {
        let mut args = vec!["--set", "training.gradient_accumulation_steps=1"];
        args.extend(extra);
        kiln(tmp.path(), out, &args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let port = || {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        l.local_addr().unwrap().port() - 1
    };
    let by_hand = tmp.path().join("by_hand");
    let elsewhere = tmp.path().join("rank1_out");
    let p = port();
    let ranks = [start(&by_hand, 0, p, &[]), start(&elsewhere, 1, p, &[])];
    for (r, child) in ranks.into_iter().enumerate() {
        let o = wait_at_most(child, Duration::from_secs(120), "a rank");
        assert!(o.status.success(), "rank {r}: {}", stderr(&o));
    }
    assert_eq!(adapter(&launched), adapter(&by_hand));
    assert!(!elsewhere.exists(), "rank 1 wrote its output.dir");

    // Rank 1 reads other data: it says so, and rank 0 stops too.
    let p = port();
    let ranks = [
        start(&tmp.path().join("bad"), 0, p, &[]),
        start(&elsewhere, 1, p, &["--set", "data.val_split=0.1"]),
    ];
    let outs: Vec<Output> = ranks
        .into_iter()
        .map(|c| wait_at_most(c, Duration::from_secs(120), "a rank"))
        .collect();
    assert!(outs.iter().all(|o| !o.status.success()));
    let err = stderr(&outs[1]);
    assert!(
        err.contains("error: rank 1:") && err.contains("every rank must read the same data"),
        "{err}"
    );
    assert!(stderr(&outs[0]).contains("rank 1"), "{}", stderr(&outs[0]));
}

/// A rank killed with SIGKILL ends the run at once with an error naming it (no hang, no
/// half-written checkpoint); the run's last checkpoint then resumes on two ranks, and on one
/// with twice the accumulation, to the adapter of the run that was never interrupted.
#[test]
fn a_killed_rank_stops_the_run_and_its_checkpoint_resumes_on_two_ranks_or_one() {
    let tmp = tempfile::tempdir().unwrap();
    let per_rank = ["--set", "training.gradient_accumulation_steps=1"];
    let whole = tmp.path().join("whole");
    let o = run(
        tmp.path(),
        &whole,
        &[&["--gpus", "2"][..], &per_rank].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));

    for (copy, resume_with) in [("on_two", &["--gpus", "2"][..]), ("on_one", &[][..])] {
        let out = tmp.path().join(copy);
        let child = kiln(
            tmp.path(),
            &out,
            &[&["--gpus", "2"][..], &per_rank].concat(),
        )
        .env("KILN_FAULT", "kill-step:5@1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let o = wait_at_most(
            child,
            Duration::from_secs(60),
            "the run after a rank's SIGKILL",
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("rank 1 was killed by signal 9") && err.contains("rank 1 exited"),
            "{err}"
        );
        assert!(!out.join("adapter").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        // A save cut off by the failure leaves a temporary directory; resume removes it.
        let o = run(
            tmp.path(),
            &out,
            &[
                &["--resume"][..],
                resume_with,
                if resume_with.is_empty() {
                    &["--set", "training.gradient_accumulation_steps=2"][..]
                } else {
                    &per_rank[..]
                },
            ]
            .concat(),
        );
        assert!(o.status.success(), "{copy} ({leftovers:?}): {}", stderr(&o));
        assert_eq!(adapter(&out), adapter(&whole), "resumed {copy}");
    }

    // Another step batch on resume is refused (it would train otherwise), naming the rule.
    let o = run(
        tmp.path(),
        &tmp.path().join("on_one"),
        &["--resume", "--gpus", "2"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("micro_batch_size x gradient_accumulation_steps x GPUs"),
        "{}",
        stderr(&o)
    );
}

/// A rank alive but stuck (its heartbeats go on) holds the others in a gradient sum: past
/// `KILN_COLLECTIVE_TIMEOUT` the run ends, with an error saying so, instead of hanging.
#[test]
fn a_stuck_rank_ends_the_run_after_the_collective_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let child = kiln(tmp.path(), &tmp.path().join("stuck"), &["--gpus", "2"])
        .env("KILN_FAULT", "stall-step:3@1")
        .env("KILN_COLLECTIVE_TIMEOUT", "3")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, Duration::from_secs(60), "the run with a stuck rank");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a gradient sum has waited 3s") && err.contains("rank 0"),
        "{err}"
    );
}

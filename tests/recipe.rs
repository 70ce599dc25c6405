//! The recipe: defaults, overrides, validation.

use std::path::Path;

use kiln::recipe::{Recipe, Scheduler};

const MINIMAL: &str =
    "[model]\npath = \"tiny:llama\"\n[data]\npath = \"d.jsonl\"\n[output]\ndir = \"o\"\n";

fn parse(text: &str, overrides: &[&str]) -> kiln::Result<Recipe> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::parse(Path::new("r.toml"), text, &o)
}

#[test]
fn shipped_recipe_parses() {
    let r = Recipe::load(Path::new("recipes/tiny.toml"), &[]).unwrap();
    assert_eq!(r.model.path, "tiny:llama");
    assert_eq!(r.lora.r, 16);
}

#[test]
fn defaults_are_the_usual_qlora_ones() {
    let r = parse(MINIMAL, &[]).unwrap();
    assert_eq!(
        r.target_modules().unwrap(),
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    );
    assert_eq!((r.lora.r, r.lora.lora_alpha), (16, 32.0));
    assert_eq!(r.training.lr_scheduler, Scheduler::Cosine);
    assert_eq!(r.training.max_grad_norm, 1.0);
    assert_eq!(r.data.max_seq_len, 2048);
    assert!(!r.data.train_on_inputs);
}

#[test]
fn overrides_set_typed_values_and_all_linear_expands() {
    let r = parse(
        MINIMAL,
        &[
            "training.learning_rate=1e-4",
            "lora.target_modules=\"all-linear\"",
            "training.lr_scheduler=linear",
            "data.train_on_inputs=true",
        ],
    )
    .unwrap();
    assert_eq!(r.training.learning_rate, 1e-4);
    assert_eq!(r.training.lr_scheduler, Scheduler::Linear);
    assert!(r.data.train_on_inputs);
    // Every projection name of every architecture; each model keeps the ones it has.
    assert_eq!(r.target_modules().unwrap().len(), 9);
    let s = kiln::lora::LoraSettings::of(&r);
    assert_eq!(s.scaling(), 2.0);
    let rs = kiln::lora::LoraSettings::of(
        &parse(
            MINIMAL,
            &["lora.use_rslora=true", "lora.r=64", "lora.lora_alpha=16"],
        )
        .unwrap(),
    );
    assert_eq!(rs.scaling(), 2.0);
}

#[test]
fn bad_values_name_the_key_and_the_allowed_values() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["training.learning_rate=2"],
            "`training.learning_rate` must be in (0, 1)",
        ),
        (
            &["lora.lora_dropout=1.5"],
            "`lora.lora_dropout` must be in [0, 1)",
        ),
        (
            &["training.micro_batch_size=0"],
            "`training.micro_batch_size` must be at least 1",
        ),
        (
            &["model.device=\"tpu\""],
            "allowed: auto, cpu, cuda, cuda:N, metal",
        ),
        (
            &["model.quantize=\"int3\""],
            "unknown variant `int3`, expected `nf4` or `none`",
        ),
        (&["data.format=\"csv\""], "unknown variant `csv`"),
        (&["training.max_steps=\"ten\""], "invalid type"),
        (
            &["lora.target_modules=\"attention\""],
            "unknown module `attention`",
        ),
        (&["nosection=1"], "must be SECTION.KEY"),
    ];
    for (overrides, needle) in cases {
        let err = parse(MINIMAL, overrides).unwrap_err().to_string();
        assert!(
            err.contains(needle),
            "{overrides:?}: expected `{needle}` in `{err}`"
        );
    }
    let err = parse(&format!("{MINIMAL}\n[training]\nlearning_rat = 1\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 9") && err.contains("unknown field `learning_rat`"),
        "{err}"
    );
}

#[test]
fn gradient_checkpointing_is_auto_by_default_and_takes_true_false_or_auto() {
    use kiln::recipe::Checkpointing;
    assert_eq!(
        parse(MINIMAL, &[]).unwrap().training.gradient_checkpointing,
        Checkpointing::Auto
    );
    for (value, want) in [
        ("true", Checkpointing::On),
        ("false", Checkpointing::Off),
        ("\"auto\"", Checkpointing::Auto),
    ] {
        let text = format!("{MINIMAL}[training]\ngradient_checkpointing = {value}\n");
        let r = parse(&text, &[]).unwrap();
        assert_eq!(r.training.gradient_checkpointing, want, "{value}");
        // The resolved recipe (written beside a run) reads back the same.
        let again = parse(&toml::to_string(&r).unwrap(), &[]).unwrap();
        assert_eq!(again.training.gradient_checkpointing, want);
    }
    let r = parse(MINIMAL, &["training.gradient_checkpointing=auto"]).unwrap();
    assert_eq!(r.training.gradient_checkpointing, Checkpointing::Auto);
    let err = parse(
        &format!("{MINIMAL}[training]\ngradient_checkpointing = \"sometimes\"\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("gradient_checkpointing") && err.contains("auto"),
        "{err}"
    );
}

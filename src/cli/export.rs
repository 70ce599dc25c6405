//! `kiln export gguf` and `kiln export gguf-adapter`: files for llama.cpp and Ollama.

use std::path::PathBuf;

use clap::Subcommand;
use kiln::error::{KilnError, Result};
use kiln::export::gguf_types::Preset;
use kiln::export::{calibrate, gguf};

use super::args;

#[derive(Subcommand)]
pub enum Command {
    /// Write a model as one GGUF file, with an Ollama Modelfile beside it.
    #[command(
        after_help = "Examples:\n  kiln export gguf --model BASE --adapter runs/x/adapter -o out/model.gguf --quant q4_k_m --eval-data held_out.jsonl\n  kiln export gguf --model BASE --adapter runs/x/adapter -o out/model.gguf --quant q4_k_m --calibrate   # rounded under the run's own rows\n  kiln export gguf --model BASE --adapter runs/x/adapter -o out/model.gguf --quant auto --size q4_k_m  # types by measured KL, Q4_K_M's size\n  kiln export gguf --model merged/ -o model-f16.gguf --quant f16\nThen: llama-cli -m out/model.gguf, or: cd out && ollama create my-model -f Modelfile\nQ4_K_M and Q2_K pick per-tensor types as llama-quantize does (Q6_K for output and some attn_v/ffn_down)."
    )]
    Gguf(GgufArgs),
    /// Write a PEFT adapter as a llama.cpp LoRA adapter (llama-cli -m base.gguf --lora FILE).
    GgufAdapter(GgufAdapterArgs),
}

#[derive(clap::Args)]
pub struct GgufArgs {
    /// A Hugging Face model directory (a merged model, or the base with --adapter).
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter to merge in first (into the NF4 weights it was trained against, unless --into original).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The .gguf file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tensor types, as llama.cpp names its file types.
    #[arg(long, value_enum, default_value = "q4_k_m")]
    pub quant: kiln::export::gguf_types::Preset,
    /// With --adapter: nf4 or original.
    #[arg(long, default_value = "nf4", requires = "adapter")]
    pub into: String,
    /// llama.cpp pre-tokenizer name, when kiln cannot tell it from tokenizer.json.
    #[arg(long)]
    pub tokenizer_pre: Option<String>,
    /// general.name (default: the file name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub held_out: args::HeldOutArgs,
    /// Calibrate the quantization on these rows (any dataset format; with --adapter from a
    /// kiln run, the run's own data when no file is given): kiln measures the importance of
    /// every weight's input columns on them (llama.cpp's imatrix, written beside the output
    /// as OUTPUT.imatrix.gguf) and rounds each weight under it, as `llama-quantize --imatrix`
    /// does. q4_k_m, q6_k, q2_k and auto.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "DATA")]
    pub calibrate: Option<String>,
    /// Rows of the calibration data to measure.
    #[arg(long, default_value_t = 64)]
    pub calibrate_rows: usize,
    /// Quantize under this importance matrix (llama.cpp's imatrix GGUF: `kiln eval
    /// --imatrix`, llama-imatrix) instead of measuring one.
    #[arg(long, conflicts_with = "calibrate")]
    pub imatrix: Option<PathBuf>,
    /// With --quant auto: the size the weights may take, as a preset's (q4_k_m, q6_k,
    /// q8_0, q4_0) or in bytes (e.g. 90MiB, 4.2GB).
    #[arg(long, default_value = "q4_k_m")]
    pub size: String,
    /// Do not write the Ollama Modelfile.
    #[arg(long)]
    pub no_modelfile: bool,
}

#[derive(clap::Args)]
pub struct GgufAdapterArgs {
    /// The PEFT adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    pub model: String,
    /// The .gguf file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// f32, f16, bf16 or q8_0.
    #[arg(long, default_value = "f32")]
    pub outtype: String,
    /// The base model as Ollama should find it (a GGUF path or an Ollama model name), for the Modelfile.
    #[arg(long)]
    pub ollama_base: Option<String>,
}

pub fn exec(cmd: Command) -> Result<()> {
    match cmd {
        Command::Gguf(args) => export_gguf(args),
        Command::GgufAdapter(args) => export_adapter(args),
    }
}

fn export_gguf(args: GgufArgs) -> Result<()> {
    let (quant, adapter, output) = (args.quant, args.adapter.as_deref(), &args.output);
    // `auto` measures on rows: the run's own when none are named.
    let calibrate = match (quant, &args.calibrate, &args.imatrix) {
        (Preset::Auto, None, None) => Some(String::new()),
        (_, c, _) => c.clone(),
    };
    if (calibrate.is_some() || args.imatrix.is_some()) && !quant.calibrates() {
        return Err(KilnError::Usage(format!(
            "--calibrate/--imatrix apply to q4_k_m, q6_k, q2_k and auto, not {} (q8_0 and the float types gain nothing from an importance matrix; llama-quantize's q4_0 with a matrix writes Q4_1, which kiln does not write)",
            quant.name()
        )));
    }
    // The calibration rows, found before any weight loads.
    let calibration = match calibrate.as_deref() {
        None => None,
        Some("") => Some(calibrate::run_data(adapter)?.ok_or_else(|| {
            KilnError::Usage(
                "--calibrate (and --quant auto) without a file needs --adapter inside a kiln run (RUN/adapter, whose recipe.toml names the data): give the rows, e.g. --calibrate train.jsonl".into(),
            )
        })?),
        Some(path) => Some(args::held_out_rows(path, &args.held_out.chat_template)?),
    };
    let imatrix = args.imatrix.as_deref().map(kiln::infer::imatrix::read);
    let into = args::parse_into(&args.into)?;
    let mut loaded = gguf::load_for_export(&args.model, adapter, into)?;
    let measure = calibrate::Measure {
        rows: calibration.as_ref(),
        max_rows: args.calibrate_rows,
        size: &args.size,
        output,
    };
    let (importance, types) = measure.run(&mut loaded, quant, imatrix.transpose()?)?;
    let opts = gguf::GgufOptions {
        preset: quant,
        tokenizer_pre: args.tokenizer_pre,
        name: args.name,
        importance,
        types,
    };
    // Its length is set by the export, which knows how many tensors it writes.
    let bar = kiln::progress::bar(0, "tensors", false);
    let summary = gguf::export_model(&loaded, output, &opts, |i, total| {
        bar.set_length(total as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    eprintln!("{summary}");
    if !args.no_modelfile {
        let path = gguf::write_modelfile_beside(&loaded, output)?;
        eprintln!(
            "wrote {} (ollama create NAME -f {})",
            path.display(),
            path.display()
        );
    }
    drop(loaded);
    // The held-out rows given, or those of the run the adapter comes from.
    let held = match args.held_out.section()? {
        Some(cfg) => Some((cfg, args.held_out.eval_rows)),
        None => calibrate::run_data(adapter)?.map(|cfg| {
            eprintln!("fidelity: on 16 rows of the adapter's run data (its validation rows, if it set some aside; --eval-data names others)");
            (cfg, 16)
        }),
    };
    match held {
        Some((cfg, rows)) => {
            let report = gguf::fidelity(&args.model, adapter, output, &cfg, rows)?;
            println!("{report}");
            if let Some(advice) = gguf::fidelity_advice(&report, quant.name()) {
                eprintln!("{advice}");
            }
        }
        None => eprintln!(
            "fidelity not measured: add --eval-data HELD_OUT.jsonl to compare the GGUF, read back by kiln, with the trained model"
        ),
    }
    Ok(())
}

fn export_adapter(args: GgufAdapterArgs) -> Result<()> {
    let dir = kiln::model::source::resolve_model_path(&args.model)?;
    let cfg = kiln::model::load_config(&dir)?;
    let peft = kiln::model::peft::read_adapter(&args.adapter)?;
    kiln::model::peft::check_adapter_shapes(&peft, &cfg)?;
    let ty = gguf::adapter_type(&args.outtype)?;
    let summary = gguf::export_adapter(&peft, &cfg, &args.output, ty, None)?;
    eprintln!("{summary}");
    let base = args.ollama_base.unwrap_or_else(|| args.model.clone());
    let path = args.output.with_file_name("Modelfile");
    let file = args::file_name(&args.output);
    kiln::io::write_atomic(
        &path,
        gguf::adapter_modelfile(&base, &format!("./{file}")).as_bytes(),
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

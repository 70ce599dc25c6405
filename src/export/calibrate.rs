//! What `kiln export gguf` measures before it writes: the importance matrix of calibration rows
//! (`--calibrate`, llama.cpp's imatrix) and, for `--quant auto`, each weight's type chosen by
//! measured KL within a size (the allocation itself is in `auto_types.rs`).

use std::collections::HashMap;
use std::path::Path;

use crate::data::Example;
use crate::error::{KilnError, Result};
use crate::export::gguf_types::Preset;
use crate::gguf::GgmlType;
use crate::model::LoadedModel;
use crate::recipe::DataSection;

/// Each weight's importance values by its GGUF name (llama.cpp's imatrix, per input column).
pub type Importance = HashMap<String, Vec<f32>>;

/// Per GGUF tensor name, the type `--quant auto` chose.
pub type TensorTypes = HashMap<String, GgmlType>;

/// The `[data]` section of the kiln run an adapter was saved by (`RUN/adapter` or
/// `RUN/checkpoint-N/adapter` beside `RUN/recipe.toml`), if it is one and its data is still
/// there: an export measures fidelity on its rows without being told.
pub fn run_data(adapter: Option<&Path>) -> Result<Option<DataSection>> {
    let Some(adapter) = adapter else {
        return Ok(None);
    };
    let recipe = adapter
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("recipe.toml"))
        .find(|p| p.is_file());
    let Some(recipe) = recipe else {
        return Ok(None);
    };
    let Ok(r) = crate::recipe::Recipe::load(&recipe, &[]) else {
        return Ok(None);
    };
    let present = r.data.path.to_vec().iter().all(|p| Path::new(p).exists());
    Ok(present.then_some(r.data))
}

/// Measures the importance matrix of `loaded` (the model being exported) on up to `rows` rows
/// of `data`, writes it beside `output` (OUTPUT.imatrix.gguf, for llama-quantize --imatrix) and
/// returns its importance values.
pub fn importance_on(
    loaded: &LoadedModel,
    data: &DataSection,
    rows: usize,
    output: &Path,
) -> Result<(Importance, Vec<Example>)> {
    let mut dataset = crate::data::load_dataset(data, &loaded.tokenizer, 0)?;
    // Validation rows first, as the fidelity check takes them.
    let mut examples = std::mem::take(&mut dataset.val);
    examples.append(&mut dataset.train);
    examples.truncate(rows);
    let bar = crate::progress::bar(examples.len(), "calibration rows", false);
    // One row a pass, so that padding is not counted.
    let (_, entries) = crate::infer::imatrix::collect(&loaded.model, || {
        crate::infer::eval::eval_loss(
            &loaded.model,
            &examples,
            loaded.tokenizer.pad_id,
            1,
            None,
            &|n| bar.inc(n as u64),
        )
    })?;
    bar.finish_and_clear();
    let path = output.with_extension("imatrix.gguf");
    let longest = examples.iter().map(|e| e.input_ids.len()).max();
    crate::infer::imatrix::write(
        &path,
        &entries,
        &data.path.to_vec(),
        examples.len() as u32,
        longest.unwrap_or(0) as u32,
    )?;
    eprintln!(
        "calibration: {} weights measured on {} rows ({} tokens); wrote {}",
        entries.len(),
        examples.len(),
        entries.first().map_or(0, |e| e.tokens),
        path.display()
    );
    Ok((crate::infer::imatrix::importance(&entries), examples))
}

/// What an export measures before it writes, and where.
pub struct Measure<'a> {
    /// The calibration rows (`--calibrate`), if any.
    pub rows: Option<&'a DataSection>,
    /// At most this many of them.
    pub max_rows: usize,
    /// `--quant auto`'s size: a preset's name or bytes (`4.5G`).
    pub size: &'a str,
    /// The GGUF file being written (the measured imatrix is written beside it).
    pub output: &'a Path,
}

impl Measure<'_> {
    /// The importance an export quantizes under (measured on the rows, or `imatrix` read from a
    /// file) and, for `--quant auto`, the per-tensor types.
    pub fn run(
        &self,
        loaded: &mut LoadedModel,
        quant: Preset,
        imatrix: Option<Importance>,
    ) -> Result<(Option<Importance>, Option<TensorTypes>)> {
        let Some(cfg) = self.rows else {
            if quant == Preset::Auto {
                return Err(KilnError::Usage(
                    "--quant auto measures each weight on calibration rows: use --calibrate [DATA] rather than --imatrix".into(),
                ));
            }
            return Ok((imatrix, None));
        };
        let (importance, rows) = importance_on(loaded, cfg, self.max_rows, self.output)?;
        let types = match quant {
            Preset::Auto => Some(auto_types(loaded, &importance, &rows, self.size)?),
            _ => None,
        };
        Ok((Some(importance), types))
    }
}

/// `--quant auto`: every weight's sensitivity measured on the calibration rows, then the types
/// within `size` (a preset's weights, or bytes) that lose the least (src/export/auto_types.rs).
pub fn auto_types(
    loaded: &mut LoadedModel,
    importance: &HashMap<String, Vec<f32>>,
    examples: &[Example],
    size: &str,
) -> Result<HashMap<String, GgmlType>> {
    use super::auto_types;
    let (planned, _) = crate::export::gguf::planned_tensors(loaded)?;
    let bar = crate::progress::bar(0, "weights measured", false);
    let choices = auto_types::price(loaded, &planned, importance, examples, &|i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    // The measured weights' budget: what the preset gives them, or the size less the rest.
    let dims: Vec<(String, Vec<u64>)> = planned
        .iter()
        .map(|(g, d, _)| (g.clone(), d.clone()))
        .collect();
    let bytes_of = |preset: crate::export::gguf_types::Preset, measured: bool| -> u64 {
        let types = crate::export::gguf_types::choose_types(preset, &dims, &loaded.model.config);
        dims.iter()
            .zip(types)
            .filter(|((g, _), _)| choices.iter().any(|c| &c.gguf == g) == measured)
            .map(|((_, d), ty)| ty.bytes_for(d.iter().product::<u64>() as usize) as u64)
            .sum()
    };
    use clap::ValueEnum;
    let budget = match crate::export::gguf_types::Preset::from_str(size, true) {
        Ok(preset) => bytes_of(preset, true),
        Err(_) => parse_size(size)?
            .saturating_sub(bytes_of(crate::export::gguf_types::Preset::Q4KM, false)),
    };
    let (types, kl, bytes) = auto_types::allocate(&choices, budget);
    let mut counts = std::collections::BTreeMap::new();
    for ty in types.values() {
        *counts.entry(ty.name()).or_insert(0usize) += 1;
    }
    eprintln!(
        "auto: {} weights measured; {:.1} MiB of {:.1} MiB for them ({}); predicted KL {:.4} nats",
        choices.len(),
        bytes as f64 / 1048576.0,
        budget as f64 / 1048576.0,
        counts
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        kl
    );
    let mut ranked: Vec<&auto_types::Choice> = choices.iter().collect();
    ranked.sort_by(|a, b| b.kl[0].total_cmp(&a.kl[0]));
    for c in ranked.iter().take(8) {
        eprintln!(
            "  {:<28} {}  (KL at {}: {:.5})",
            c.gguf,
            types[&c.gguf].name(),
            c.types[0].name(),
            c.kl[0]
        );
    }
    Ok(types)
}

/// `90MiB`, `4.2GB`, `1e9` → bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        _ => f64::NAN,
    };
    let value: f64 = number.trim().parse().unwrap_or(f64::NAN) * scale;
    if !value.is_finite() || value <= 0.0 {
        return Err(KilnError::Usage(format!(
            "--size `{text}`: give a preset (q4_k_m, q6_k, q8_0, q4_0) or a size such as 90MiB or 4.2GB"
        )));
    }
    Ok(value as u64)
}

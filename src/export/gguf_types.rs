//! llama.cpp's quantization presets: the per-tensor types `llama-quantize` picks for each file type.

use crate::gguf::GgmlType;
use crate::model::ModelConfig;

/// What `kiln export gguf --quant` accepts: llama.cpp's file types of the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q6_k")]
    Q6K,
    #[value(name = "q2_k")]
    Q2K,
    /// Per-tensor types measured under a size budget (`--size`, Q4_K_M's by default).
    Auto,
}

impl Preset {
    /// Whether kiln quantizes this preset under an importance matrix (its types' weighted
    /// quantizers are in `calibrated`).
    pub fn calibrates(self) -> bool {
        matches!(
            self,
            Preset::Q4KM | Preset::Q6K | Preset::Q2K | Preset::Auto
        )
    }

    /// `general.file_type` (llama_ftype).
    pub fn file_type(self) -> u32 {
        match self {
            Preset::F32 => 0,
            Preset::F16 => 1,
            Preset::Q4_0 => 2,
            Preset::Q8_0 => 7,
            Preset::Q2K => 10,
            Preset::Q4KM => 15,
            Preset::Q6K => 18,
            Preset::Bf16 => 32,
            // LLAMA_FTYPE_GUESSED: no one type describes a mix chosen per tensor.
            Preset::Auto => 1024,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::F32 => "F32",
            Preset::F16 => "F16",
            Preset::Bf16 => "BF16",
            Preset::Q8_0 => "Q8_0",
            Preset::Q4_0 => "Q4_0",
            Preset::Q4KM => "Q4_K_M",
            Preset::Q6K => "Q6_K",
            Preset::Q2K => "Q2_K",
            Preset::Auto => "auto",
        }
    }

    fn default_type(self) -> GgmlType {
        match self {
            Preset::F32 => GgmlType::F32,
            Preset::F16 => GgmlType::F16,
            Preset::Bf16 => GgmlType::BF16,
            Preset::Q8_0 => GgmlType::Q8_0,
            Preset::Q4_0 => GgmlType::Q4_0,
            Preset::Q4KM => GgmlType::Q4_K,
            Preset::Q6K => GgmlType::Q6_K,
            Preset::Q2K => GgmlType::Q2_K,
            Preset::Auto => GgmlType::Q4_K,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Preset::F32 | Preset::F16 | Preset::Bf16)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of layers and every third between.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A 256-block type's replacement when rows are not a multiple of 256, then F16.
fn fallback(ty: GgmlType, row: u64) -> GgmlType {
    if row.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let alt = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row.is_multiple_of(alt.block_size() as u64) {
        alt
    } else {
        GgmlType::F16
    }
}

/// The storage type of every tensor (GGUF names and dims, in file order), as convert_hf_to_gguf
/// (float presets) or llama-quantize (quantized presets) choose them: 1-D tensors and norms
/// F32; `output` Q6_K; `attn_v` and `ffn_down` Q6_K in the layers `use_more_bits` picks for
/// Q4_K_M; Q2_K's Q3_K/Q4_K exceptions; fallbacks for rows that blocks do not divide.
/// The per-layer counters advance in llama-quantize's order, which is not file order: its model
/// loader sorts tensors by block number, then by name (`weight_name_comparer`), so `blk.10`
/// comes after `blk.9` whatever order the file holds them in.
pub fn choose_types(
    preset: Preset,
    tensors: &[(String, Vec<u64>)],
    cfg: &ModelConfig,
) -> Vec<GgmlType> {
    // `auto` starts from Q4_K_M's choices; the export replaces the weights it measured.
    let preset = if preset == Preset::Auto {
        Preset::Q4KM
    } else {
        preset
    };
    let mut chooser = TypeChooser {
        preset,
        n_attn_v: tensors.iter().filter(|(n, _)| is_attn_v(n)).count() as i64,
        n_layer: cfg.num_layers as i64,
        n_gqa: cfg.num_heads / cfg.num_kv_heads.max(1),
        n_expert: cfg.num_experts,
        has_output: tensors.iter().any(|(n, _)| n == "output.weight"),
        i_attn_v: 0,
        i_ffn_down: 0,
    };
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (block_of(&tensors[i].0).unwrap_or(-1), &tensors[i].0));
    let mut types = vec![GgmlType::F32; tensors.len()];
    for i in order {
        types[i] = chooser.type_of(&tensors[i].0, &tensors[i].1);
    }
    types
}

/// Whether llama-quantize quantizes this tensor (matrices; not norms or a router).
pub fn quantizable(name: &str, dims: &[u64]) -> bool {
    dims.len() >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
}

/// llama-quantize counts the fused attn_qkv as an attn_v (`category_is_attn_v`).
fn is_attn_v(name: &str) -> bool {
    name.contains("attn_v.weight") || name.contains("attn_qkv.weight")
}

/// N of a `blk.N.` tensor name.
fn block_of(name: &str) -> Option<i64> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama-quantize's type rules and the counters they read, fed tensors in its order.
struct TypeChooser {
    preset: Preset,
    n_attn_v: i64,
    n_layer: i64,
    n_gqa: usize,
    n_expert: usize,
    has_output: bool,
    i_attn_v: i64,
    i_ffn_down: i64,
}

impl TypeChooser {
    fn type_of(&mut self, name: &str, dims: &[u64]) -> GgmlType {
        if !quantizable(name, dims) {
            return GgmlType::F32;
        }
        let preset = self.preset;
        if preset.is_float() {
            return preset.default_type();
        }
        let mut ty = preset.default_type();
        let row = dims[0];
        let is_output =
            name == "output.weight" || (!self.has_output && name == "token_embd.weight");
        if is_output {
            ty = if !row.is_multiple_of(ty.block_size() as u64) {
                GgmlType::Q8_0
            } else if ty != GgmlType::Q8_0 {
                GgmlType::Q6_K
            } else {
                ty
            };
        } else if is_attn_v(name) {
            match preset {
                Preset::Q2K => {
                    ty = if self.n_gqa >= 4 {
                        GgmlType::Q4_K
                    } else {
                        GgmlType::Q3_K
                    }
                }
                Preset::Q4KM if use_more_bits(self.i_attn_v, self.n_attn_v) => ty = GgmlType::Q6_K,
                _ => {}
            }
            if self.n_expert == 8 {
                ty = GgmlType::Q8_0; // ~128 MB on Mixtral 8x7B, as llama-quantize does
            }
            self.i_attn_v += 1;
        } else if name.contains("attn_k.weight") && self.n_expert == 8 {
            ty = GgmlType::Q8_0;
        } else if name.contains("ffn_down") {
            // With experts, llama-quantize takes ffn_down's layer from the name, else it counts.
            let i = match block_of(name) {
                Some(l) if self.n_expert > 1 => l,
                _ => self.i_ffn_down,
            };
            match preset {
                Preset::Q2K => ty = GgmlType::Q3_K,
                Preset::Q4KM if use_more_bits(i, self.n_layer) => ty = GgmlType::Q6_K,
                _ => {}
            }
            self.i_ffn_down += 1;
        } else if name.contains("attn_output.weight") {
            match preset {
                Preset::Q2K | Preset::Q4KM if self.n_expert == 8 => ty = GgmlType::Q5_K,
                Preset::Q2K => ty = GgmlType::Q3_K,
                _ => {}
            }
        }
        fallback(ty, row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_matches_llama_cpp_on_32_layers() {
        let picked: Vec<i64> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }
}

//! `kiln eval --imatrix`: llama.cpp's importance matrix of the evaluated rows (Σ of each input
//! column's square per linear layer, and the token count), in llama.cpp's imatrix GGUF format.

mod common;

use candle_core::Device;

#[test]
fn eval_writes_the_importance_matrix_of_each_projection_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let config = kiln::model::tiny::tiny_llama_config();
    kiln::model::tiny::write_random_model(&dir, &config, 3, true).unwrap();
    let out = tmp.path().join("model.imatrix.gguf");
    common::kiln_stdout(&[
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        "tests/fixtures/data/eval_text.jsonl",
        "--dtype",
        "f32",
        "--imatrix",
        out.to_str().unwrap(),
    ]);
    let file = kiln::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(file.require_str("general.type").unwrap(), "imatrix");
    let get = |name: &str| -> Vec<f32> {
        let entry = file
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        file.tensor_f32(entry).unwrap()
    };
    let n = |key: &str| config[key].as_u64().unwrap() as usize;
    let (layers, hidden, inter) = (
        n("num_hidden_layers"),
        n("hidden_size"),
        n("intermediate_size"),
    );
    let weights = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    assert_eq!(file.tensors.len(), layers * weights.len() * 2);
    // Every projection saw every token; the sums have one value an input column.
    let tokens = get("blk.0.attn_q.weight.counts")[0];
    assert!(tokens > 10.0, "{tokens} tokens");
    for i in 0..layers {
        for w in weights {
            assert_eq!(get(&format!("blk.{i}.{w}.weight.counts")), vec![tokens]);
            let columns = if w == "ffn_down" { inter } else { hidden };
            assert_eq!(
                get(&format!("blk.{i}.{w}.weight.in_sum2")).len(),
                columns,
                "{w}"
            );
        }
        // Projections that share an input share its statistics.
        let q = get(&format!("blk.{i}.attn_q.weight.in_sum2"));
        assert_eq!(q, get(&format!("blk.{i}.attn_k.weight.in_sum2")));
        assert_eq!(q, get(&format!("blk.{i}.attn_v.weight.in_sum2")));
        let gate = get(&format!("blk.{i}.ffn_gate.weight.in_sum2"));
        assert_eq!(gate, get(&format!("blk.{i}.ffn_up.weight.in_sum2")));
        assert_ne!(q, gate);
    }
    // The first layer's q/k/v input is RMSNorm(x)·w: per token Σ_c (x_c·r)² = hidden (up to
    // eps), so Σ_c in_sum2[c] / w_c² = tokens · hidden.
    let norm = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
        ["model.layers.0.input_layernorm.weight"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let q = get("blk.0.attn_q.weight.in_sum2");
    let unweighted: f64 = q
        .iter()
        .zip(&norm)
        .map(|(&s, &w)| s as f64 / (w as f64 * w as f64))
        .sum();
    let ratio = unweighted / (tokens as f64 * hidden as f64);
    assert!(
        (ratio - 1.0).abs() < 1e-3,
        "Σ in_sum2 / w² = {ratio} × tokens · hidden"
    );
}

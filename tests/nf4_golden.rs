//! NF4 + double quantization against bitsandbytes' CUDA quantizer, byte for byte
//! (tests/fixtures/nf4_bnb_golden.safetensors, made by scripts/golden/make_nf4_golden.py on an H200).

mod common;

use candle_core::{DType, Device, Tensor};
use common::f32s;
use kiln::model::bitsandbytes::linear4bit_tensors;
use kiln::quant::nf4::{double_quantize, quantize_blocks, Absmax, Nf4Tensor, BLOCKSIZE};
use std::collections::HashMap;

const CASES: &[&str] = &[
    "odd_f32",
    "zero_block_f16",
    "nested3_bf16",
    "spread_f32",
    "large_bf16",
];

fn golden(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("tests/fixtures/{file}"), &Device::Cpu).unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn quantize_case(g: &HashMap<String, Tensor>, name: &str) -> (Nf4Tensor, Tensor) {
    let input = &g[&format!("{name}.input")];
    let q = Nf4Tensor::quantize(&f32s(input), input.dims(), input.dtype()).unwrap();
    (q, input.clone())
}

#[test]
fn packed_codes_match_bitsandbytes_bytes() {
    let g = golden("nf4_bnb_golden.safetensors");
    for name in CASES {
        let (q, _) = quantize_case(&g, name);
        let want = u8s(&g[&format!("{name}.packed")]);
        assert_eq!(q.packed.len(), want.len(), "{name}: packed length");
        let diff = q.packed.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff,
            0,
            "{name}: {diff} of {} packed bytes differ",
            want.len()
        );
    }
}

#[test]
fn double_quantized_absmax_matches_bitsandbytes() {
    let g = golden("nf4_bnb_golden.safetensors");
    for name in CASES {
        let (q, _) = quantize_case(&g, name);
        let Absmax::Nested {
            codes,
            nested_absmax,
            offset,
            nested_code,
            ..
        } = &q.absmax
        else {
            panic!("not nested")
        };
        let want_offset = f32s(&g[&format!("{name}.offset")])[0];
        assert_eq!(
            offset.to_bits(),
            want_offset.to_bits(),
            "{name}: offset {offset} vs {want_offset}"
        );
        assert_eq!(
            nested_absmax,
            &f32s(&g[&format!("{name}.nested_absmax")]),
            "{name}: nested absmax"
        );
        let want_codes = u8s(&g[&format!("{name}.absmax")]);
        let diff = codes
            .iter()
            .zip(&want_codes)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(codes.len(), want_codes.len(), "{name}: absmax length");
        assert_eq!(
            diff,
            0,
            "{name}: {diff} of {} absmax codes differ",
            codes.len()
        );
        assert_eq!(nested_code, &f32s(&g["nested_quant_map"]));
    }
    assert_eq!(kiln::quant::nf4::nf4_code().to_vec(), f32s(&g["quant_map"]));
}

#[test]
fn dequantization_matches_bitsandbytes_output() {
    let g = golden("nf4_bnb_golden.safetensors");
    for name in CASES {
        let (q, input) = quantize_case(&g, name);
        // bnb dequantizes in f32 and casts to the original dtype.
        let ours = Tensor::from_vec(q.dequantize(), input.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(input.dtype())
            .unwrap();
        let want = &g[&format!("{name}.dequant")];
        let (a, b) = (f32s(&ours), f32s(want));
        let diff = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            diff,
            0,
            "{name}: {diff} of {} dequantized values differ",
            a.len()
        );
        // And the quantization error is what NF4 promises: within half a code step of absmax.
        let x = f32s(&input);
        let worst = x
            .chunks(BLOCKSIZE)
            .zip(a.chunks(BLOCKSIZE))
            .map(|(xs, ys)| {
                // An all-zero block dequantizes to about 0 (its scale is double-quantized).
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if amax == 0.0 { 1.0 } else { amax };
                xs.iter()
                    .zip(ys)
                    .map(|(x, y)| (x - y).abs() / scale)
                    .fold(0f32, f32::max)
            })
            .fold(0f32, f32::max);
        // Rows of very different scale (spread, large) give blocks whose small absmax the
        // 8-bit double quantization cannot resolve: bnb has the same error there.
        if !name.starts_with("spread") && !name.starts_with("large") {
            assert!(worst < 0.2, "{name}: relative error {worst}");
        }
    }
}

#[test]
fn blocks_and_nested_blocks_have_the_bitsandbytes_counts() {
    let values: Vec<f32> = (0..39000)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let (packed, absmax) = quantize_blocks(&values, 64);
    assert_eq!(packed.len(), 19500);
    assert_eq!(absmax.len(), 610);
    let Absmax::Nested {
        codes,
        nested_absmax,
        ..
    } = double_quantize(&absmax)
    else {
        unreachable!()
    };
    assert_eq!((codes.len(), nested_absmax.len()), (610, 3));
}

#[test]
fn serialized_linear4bit_matches_bitsandbytes_state_dict() {
    let g = golden("nf4_bnb_golden.safetensors");
    let want = golden("linear4bit_state.safetensors");
    // scripts/golden/make_nf4_golden.py quantized odd_f32's input cast to bf16 through Linear4bit.
    let w = g["odd_f32.input"].to_dtype(DType::BF16).unwrap();
    let q = Nf4Tensor::quantize(&f32s(&w), w.dims(), DType::BF16).unwrap();
    let ours = linear4bit_tensors("q_proj.weight", &q);
    let mut names: Vec<&String> = ours.iter().map(|(n, _)| n).collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names);
    let raw = std::fs::read("tests/fixtures/linear4bit_state.safetensors").unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    for (name, data) in &ours {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), data.dtype, "{name} dtype");
        assert_eq!(view.shape(), data.shape.as_slice(), "{name} shape");
        assert_eq!(view.data(), data.bytes.as_slice(), "{name} bytes");
    }
}

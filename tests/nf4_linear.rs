//! The frozen 4-bit linear: forward and input gradient against a dense f32 reference, and the
//! backward pass recomputing the weight from the packed codes.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use kiln::ops::nf4_linear::dequantizations;
use kiln::ops::{Nf4Linear, Nf4Weight};
use kiln::quant::Nf4Tensor;
use kiln::rng::KilnRng;

fn setup(out_f: usize, in_f: usize) -> (Nf4Linear, Tensor) {
    let mut rng = KilnRng::new(3);
    let w = rng.normal(out_f * in_f, 0.0, 0.05);
    let q = Nf4Tensor::quantize(&w, &[out_f, in_f], DType::F32).unwrap();
    let deq = Tensor::from_vec(q.dequantize(), (out_f, in_f), &Device::Cpu).unwrap();
    (
        Nf4Linear::new(Nf4Weight::new(q, &Device::Cpu).unwrap()),
        deq,
    )
}

#[test]
fn forward_and_gradients_match_dense_reference() {
    let (lin, deq) = setup(96, 128);
    let mut rng = KilnRng::new(4);
    let x = Var::from_tensor(
        &Tensor::from_vec(rng.normal(2 * 5 * 128, 0.0, 1.0), (2, 5, 128), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let probe =
        Tensor::from_vec(rng.normal(2 * 5 * 96, 0.0, 1.0), (2, 5, 96), &Device::Cpu).unwrap();

    let y = lin.forward(x.as_tensor()).unwrap();
    let y_ref = x.as_tensor().broadcast_matmul(&deq.t().unwrap()).unwrap();
    let fwd = common::max_abs_diff(&y, &y_ref);
    assert!(fwd < 1e-5, "forward differs by {fwd}");

    let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (dx, dx_ref) = (
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
    );
    let err = common::max_abs_diff(dx, dx_ref);
    assert!(err < 1e-5, "dL/dx differs by {err}");
}

#[test]
fn backward_recomputes_the_weight_from_packed_codes() {
    let (lin, _) = setup(64, 64);
    let x = Var::from_tensor(&Tensor::ones((3, 64), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let before = dequantizations();
    let y = lin.forward(x.as_tensor()).unwrap();
    let after_forward = dequantizations();
    let _ = y.sum_all().unwrap().backward().unwrap();
    let after_backward = dequantizations();
    // Tests in this file run in parallel; at least one more dequantization happened in each phase.
    assert!(after_forward > before, "forward dequantizes");
    assert!(
        after_backward > after_forward,
        "backward dequantizes again instead of keeping deq(W) alive"
    );
}

#[test]
fn constant_input_builds_no_autograd_graph() {
    let (lin, _) = setup(64, 64);
    let x = Tensor::ones((2, 64), DType::F32, &Device::Cpu).unwrap();
    let y = lin.forward(&x).unwrap();
    assert!(
        !y.track_op(),
        "a constant input must not build an autograd graph"
    );
}

#[test]
fn generic_device_dequantization_equals_the_host_path_bit_for_bit() {
    // GPUs dequantize with generic candle ops from the stored codes and nested scales; run
    // that path on the CPU and compare with the plain-Rust path (odd size: padded blocks).
    let mut rng = KilnRng::new(9);
    let (rows, cols) = (37, 130);
    let w = rng.normal(rows * cols, 0.0, 0.1);
    let q = Nf4Tensor::quantize(&w, &[rows, cols], DType::BF16).unwrap();
    let host = Nf4Weight::new(q.clone(), &Device::Cpu).unwrap();
    let generic = Nf4Weight::with_device_copy(q, &Device::Cpu).unwrap();
    let a = host.dequantize(DType::F32, &Device::Cpu).unwrap();
    let b = generic.dequantize(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(a.dims(), b.dims());
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    let diff = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(diff, 0, "{diff} of {} values differ", a.len());
}

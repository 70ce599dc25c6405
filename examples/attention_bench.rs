//! Times kiln's flash-attention kernels on the GPU at the shapes of ../shared/bench/README.md
//! (causal, bf16, 32 query / 8 key-value heads), and cuDNN's fused kernels where they load
//! (src/cuda/cudnn_attention.rs), as the explicit training step calls them:
//! token-major heads `[B, T, heads, D]`, the forward alone, and forward + backward (the
//! backward's Δ pass included). With `--autograd`, through the attention op and candle autograd
//! instead (heads-major, with the op's copies; KILN_FLASH=0 makes that the blocked path).
//!   cargo build --release --features cuda --example attention_bench   (scripts/build/build_cuda.sh)
//!   /tmp/attention-bench [--autograd]                                 (on the GPU machine)
//! TFLOP/s counts the causal half, as the reference table does: forward 2·B·H·T²·D, forward +
//! backward 3.5 times that.

#[cfg(feature = "cuda")]
fn main() -> candle_core::Result<()> {
    use candle_core::{DType, Tensor, Var};
    use kiln::ops::HeadLayout;
    use std::time::Instant;
    let autograd = std::env::args().any(|a| a == "--autograd");
    let dev = kiln::device::open("cuda:0").expect("a CUDA device");
    println!(
        "{}",
        if autograd {
            "through the attention op and autograd"
        } else {
            "the kernels, token-major"
        }
    );
    println!("| shape | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |");
    println!("|---|---|---|---|---|");
    for (b, t, d) in [(4, 2048, 64), (4, 2048, 128), (1, 16384, 128)] {
        let (h, kv) = (32, 8);
        let randn = |heads: usize| -> candle_core::Result<Tensor> {
            let shape = if autograd {
                (b, heads, t, d)
            } else {
                (b, t, heads, d)
            };
            Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(DType::BF16)
        };
        let (q, k, v, up) = (
            Var::from_tensor(&randn(h)?)?,
            Var::from_tensor(&randn(kv)?)?,
            Var::from_tensor(&randn(kv)?)?,
            randn(h)?,
        );
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let scale = 1.0 / (d as f64).sqrt();
        let sync = || dev.synchronize();
        let time = |f: &dyn Fn() -> candle_core::Result<()>| -> candle_core::Result<f64> {
            for _ in 0..3 {
                f()?;
            }
            sync()?;
            let n = 20;
            let t0 = Instant::now();
            for _ in 0..n {
                f()?;
            }
            sync()?;
            Ok(t0.elapsed().as_secs_f64() / n as f64)
        };
        let layout = HeadLayout::TokenMajor;
        let mut rows: Vec<(&str, f64, f64)> = vec![];
        if autograd {
            let fwd = || kiln::ops::attention(q, k, v, None, scale, None, true);
            rows.push((
                "op + autograd",
                time(&|| fwd().map(|_| ()))?,
                time(&|| {
                    let o = fwd()?;
                    (o * &up)?.sum_all()?.backward().map(|_| ())
                })?,
            ));
        } else {
            let fwd = || kiln::cuda::flash_attention_forward(q, k, v, scale as f32, true, layout);
            rows.push((
                "kiln flash",
                time(&|| fwd().map(|_| ()))?,
                time(&|| {
                    let (o, lse) = fwd()?;
                    kiln::cuda::flash_attention_backward(
                        q,
                        k,
                        v,
                        &o,
                        &lse,
                        &up,
                        scale as f32,
                        true,
                        layout,
                    )
                    .map(|_| ())
                })?,
            ));
            // What the training step runs: cuDNN's fused kernels where they load.
            let fused = || kiln::cuda::fused_attention_forward(q, k, v, scale as f32, true, layout);
            let (_, stats) = fused()?;
            if matches!(stats, kiln::cuda::AttentionStats::Cudnn(_)) {
                rows.push((
                    "cuDNN",
                    time(&|| fused().map(|_| ()))?,
                    time(&|| {
                        let (o, stats) = fused()?;
                        kiln::cuda::fused_attention_backward(
                            q,
                            k,
                            v,
                            &o,
                            &stats,
                            &up,
                            scale as f32,
                            true,
                            layout,
                        )
                        .map(|_| ())
                    })?,
                ));
            }
        }
        let flops = 2.0 * (b * h * t * t * d) as f64;
        for (kernels, f, fb) in rows {
            println!(
                "| B{b} T{t} D{d}, {kernels} | {:.3} | {:.0} | {:.3} | {:.0} |",
                f * 1e3,
                flops / f / 1e12,
                fb * 1e3,
                3.5 * flops / fb / 1e12
            );
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("attention_bench needs --features cuda");
}

//! Times kiln's attention on the GPU at the shapes of ../shared/bench/README.md (causal, bf16,
//! 32 query / 8 key-value heads), forward and forward + backward, through the attention op as
//! training runs it: the flash kernels, or with KILN_FLASH=0 the blocked path.
//!   cargo build --release --features cuda --example attention_bench   (scripts/build_cuda.sh)
//!   /tmp/attention-bench                                              (on the GPU machine)
//! TFLOP/s counts the causal half, as the reference table does: forward 2·B·H·T²·D, forward +
//! backward 3.5 times that.

#[cfg(feature = "cuda")]
fn main() -> candle_core::Result<()> {
    use candle_core::{DType, Tensor, Var};
    use std::time::Instant;
    let dev = kiln::device::open("cuda:0").expect("a CUDA device");
    println!("| shape | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |");
    println!("|---|---|---|---|---|");
    for (b, t, d) in [(4, 2048, 64), (4, 2048, 128), (1, 16384, 128)] {
        let (h, kv) = (32, 8);
        let q =
            Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(DType::BF16)?)?;
        let k = Var::from_tensor(
            &Tensor::randn(0f32, 1., (b, kv, t, d), &dev)?.to_dtype(DType::BF16)?,
        )?;
        let v = Var::from_tensor(
            &Tensor::randn(0f32, 1., (b, kv, t, d), &dev)?.to_dtype(DType::BF16)?,
        )?;
        let up = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?.to_dtype(DType::BF16)?;
        let scale = 1.0 / (d as f64).sqrt();
        let fwd = || {
            kiln::ops::attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                None,
                scale,
                None,
                true,
            )
        };
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
        let f = time(&|| fwd().map(|_| ()))?;
        let fb = time(&|| {
            let o = fwd()?;
            (o * &up)?.sum_all()?.backward().map(|_| ())
        })?;
        let flops = 2.0 * (b * h * t * t * d) as f64;
        println!(
            "| B{b} T{t} D{d} | {:.3} | {:.0} | {:.3} | {:.0} |",
            f * 1e3,
            flops / f / 1e12,
            fb * 1e3,
            3.5 * flops / fb / 1e12
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("attention_bench needs --features cuda");
}

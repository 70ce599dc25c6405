//! With the `cuda` feature, compiles kiln's CUDA kernels (src/cuda/*.cu) to PTX, one module a file, with nvcc,
//! for the compute capability in `CUDA_COMPUTE_CAP` (default 80; the H100/H200 is 90). CPU and
//! Metal builds need no CUDA toolkit.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-changed=src/cuda/common.cuh");
    println!("cargo:rerun-if-changed=src/cuda/mma.cuh");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // One PTX module per kernel file.
    for (source, ptx) in [
        ("src/cuda/nf4.cu", "nf4.ptx"),
        ("src/cuda/dropout.cu", "dropout.ptx"),
        ("src/cuda/softmax.cu", "softmax.ptx"),
        ("src/cuda/cross_entropy.cu", "cross_entropy.ptx"),
        ("src/cuda/flash_attention.cu", "flash_attention.ptx"),
        ("src/cuda/pointwise.cu", "pointwise.ptx"),
        ("src/cuda/optimizer.cu", "optimizer.ptx"),
        ("src/cuda/distill.cu", "distill.ptx"),
    ] {
        println!("cargo:rerun-if-changed={source}");
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "--std=c++17", "-Isrc/cuda"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(source)
            .arg("-o")
            .arg(out_dir.join(ptx))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} to build {source}: {e}; install the CUDA toolkit (see README, CUDA)"));
        assert!(status.success(), "nvcc failed on {source}");
    }
}

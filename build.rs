//! With the `cuda` feature, compiles kiln's CUDA kernels (src/cuda/kernels.cu) to PTX with nvcc,
//! for the compute capability in `CUDA_COMPUTE_CAP` (default 80; the H100/H200 is 90). CPU and
//! Metal builds need no CUDA toolkit.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kiln_kernels.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} to build src/cuda/kernels.cu: {e}; install the CUDA toolkit (see README, CUDA)"));
    assert!(status.success(), "nvcc failed on src/cuda/kernels.cu");
}

//! Choosing the device and compute dtype from the recipe or the command line.

use candle_core::{DType, Device};

use crate::error::{KilnError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

pub fn parse_device_spec(s: &str) -> std::result::Result<DeviceSpec, String> {
    let s = s.trim().to_ascii_lowercase();
    let ordinal = |rest: &str| -> std::result::Result<usize, String> {
        if rest.is_empty() {
            return Ok(0);
        }
        rest.strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("`{s}`: expected e.g. cuda:0"))
    };
    match s.as_str() {
        "auto" => Ok(DeviceSpec::Auto),
        "cpu" => Ok(DeviceSpec::Cpu),
        _ if s.starts_with("cuda") => Ok(DeviceSpec::Cuda(ordinal(&s[4..])?)),
        _ if s.starts_with("metal") => Ok(DeviceSpec::Metal(ordinal(&s[5..])?)),
        _ => Err(format!(
            "`{s}` is not a device; allowed: auto, cpu, cuda, cuda:N, metal"
        )),
    }
}

/// The device of one rank of a distributed run: GPU `local_rank` where the spec is `auto` or
/// `cuda[:N]` (or GPU 0 where the launcher left each rank one visible GPU), else the CPU.
pub fn open_for_rank(spec: &str, local_rank: usize) -> Result<Device> {
    let parsed = parse_device_spec(spec).map_err(KilnError::Usage)?;
    match parsed {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Metal(_) => Err(KilnError::Usage(
            "several processes train on CUDA GPUs (or the CPU, for testing); not on Metal".into(),
        )),
        DeviceSpec::Auto | DeviceSpec::Cuda(_) => {
            let visible = crate::cuda::device_count();
            if visible == 0 {
                if parsed == DeviceSpec::Auto {
                    return Ok(Device::Cpu);
                }
                return open(spec);
            }
            let ordinal = if visible == 1 { 0 } else { local_rank };
            if ordinal >= visible {
                return Err(KilnError::Usage(format!(
                    "LOCAL_RANK {local_rank} has no GPU: {visible} are visible; start at most {visible} ranks on this host"
                )));
            }
            open(&format!("cuda:{ordinal}"))
        }
    }
}

/// Opens the device; `auto` takes a GPU when kiln was built with one and one is present.
pub fn open(spec: &str) -> Result<Device> {
    let spec = parse_device_spec(spec).map_err(KilnError::Usage)?;
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(single_stream(d));
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        DeviceSpec::Cuda(i) => Device::new_cuda(i).map(single_stream).map_err(|e| {
            KilnError::Usage(format!("cannot open cuda:{i}: {e}; build kiln with `--features cuda` on a machine with CUDA"))
        }),
        DeviceSpec::Metal(i) => Device::new_metal(i)
            .map_err(|e| KilnError::Usage(format!("cannot open metal:{i}: {e}; build kiln with `--features metal` on macOS"))),
    }
}

/// The device as kiln runs it (CUDA: one stream, freed memory kept pooled).
fn single_stream(device: Device) -> Device {
    crate::cuda::prepare_device(&device);
    device
}

/// The compute dtype `auto` stands for: f32 on the CPU, bf16 on a GPU.
pub fn auto_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// The machine's physical memory, where the platform says (Linux and macOS through sysconf).
pub fn host_memory_bytes() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads system constants and has no preconditions.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && page > 0 {
            return Some(pages as u64 * page as u64);
        }
    }
    None
}

/// CPU training allocates the same large buffers every micro-batch (the loss chunk's logits and
/// their gradient: 206 MB each on the CPU benchmark job). glibc serves blocks that large with fresh
/// `mmap`s and unmaps them when freed, so every step pays for faulting 100k new pages in. This
/// keeps freed memory in the heap for reuse instead (blocks up to 1 GiB from the heap, no
/// trimming): +20% tokens/s on that job (BENCHMARKS.md). Resident memory then stays at
/// its high-water mark, which is why only CPU training asks for it.
pub fn reuse_freed_host_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

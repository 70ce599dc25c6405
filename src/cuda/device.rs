//! The device itself: how many there are, how kiln sets one up, its free memory, timing events,
//! the profiler's capture, and the raw stream and context a foreign library (NCCL) runs on.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, CudaEvent};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Device, Result};

/// CUDA GPUs this process can see.
pub fn device_count() -> usize {
    if candle_core::utils::cuda_is_available() {
        return CudaContext::device_count().map_or(0, |n| n as usize);
    }
    0
}

/// kiln runs all its CUDA work on the device's one stream, so the per-buffer events cudarc
/// records to order work across streams are pure overhead (a record per launch): turn them off,
/// and keep freed memory pooled.
pub fn prepare_device(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: kiln never uses a second stream, so no buffer is shared across streams.
        unsafe { d.disable_event_tracking() };
        keep_freed_memory(d);
    }
}

/// candle allocates with `cuMemAllocAsync` from the device's default pool, whose release
/// threshold is 0: at every synchronisation (each step reads its loss) the pool hands its free
/// memory back to the driver, and the next step maps it again, allocation by allocation. A
/// threshold of "everything" keeps it pooled, as PyTorch's caching allocator does; the
/// driver-reported peak is unchanged (the pool never holds more than the step's peak).
/// `KILN_POOL_RELEASE=1` restores the driver's default (to compare).
fn keep_freed_memory(d: &CudaDevice) {
    if std::env::var("KILN_POOL_RELEASE").as_deref() == Ok("1") {
        return;
    }
    let device = d.cuda_stream().context().cu_device();
    let mut threshold = u64::MAX;
    // SAFETY: a device of this context; the attribute takes a u64.
    let set = unsafe {
        result::device::get_default_mem_pool(device).and_then(|pool| {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
        })
    };
    if let Err(e) = set {
        eprintln!("note: the CUDA memory pool keeps its default release threshold ({e})");
    }
}

/// Free memory of a CUDA device, in bytes (`None` for any other device).
pub fn free_memory(device: &Device) -> Result<Option<usize>> {
    match device {
        Device::Cuda(d) => {
            let (free, _total) = d.cuda_stream().context().mem_get_info().w()?;
            Ok(Some(free))
        }
        _ => Ok(None),
    }
}

/// Device memory in use, as the driver counts it (total minus free); `None` off CUDA.
pub fn memory_in_use(device: &Device) -> Option<usize> {
    if !device.is_cuda() {
        return None;
    }
    result::mem_get_info()
        .ok()
        .map(|(free, total)| total - free)
}

/// A timing event recorded on a device's stream.
pub struct Event(CudaEvent);

impl Event {
    /// Records an event on `device`'s stream now (`None` off CUDA, or when recording fails).
    pub fn record(device: &Device) -> Option<Event> {
        match device {
            Device::Cuda(d) => d
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .ok()
                .map(Event),
            _ => None,
        }
    }

    /// Milliseconds from this event to `end` (NaN if either has not completed).
    pub fn elapsed_ms(&self, end: &Event) -> f64 {
        self.0.elapsed_ms(&end.0).unwrap_or(f32::NAN) as f64
    }
}

/// Starts the CUDA profiler's capture (for `ncu --profile-from-start off`).
pub fn profiler_start() {
    // SAFETY: no preconditions; a no-op without a profiler attached.
    unsafe {
        sys::cuProfilerStart();
    }
}

/// Stops the CUDA profiler's capture.
pub fn profiler_stop() {
    // SAFETY: as `profiler_start`.
    unsafe {
        sys::cuProfilerStop();
    }
}

/// `device`'s context bound to this thread, and its stream's raw handle, for a library that
/// launches its own work on it.
pub fn stream_handle(device: &Device) -> Result<*mut c_void> {
    let Device::Cuda(d) = device else {
        candle_core::bail!("not a CUDA device: {device:?}");
    };
    let stream = d.cuda_stream();
    stream.context().bind_to_thread().w()?;
    Ok(stream.cu_stream() as *mut c_void)
}

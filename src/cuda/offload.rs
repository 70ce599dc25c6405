//! Offloaded checkpoints (`gradient_checkpointing = "offload"`): a recomputed layer's input
//! goes to pinned host memory instead of staying on the GPU, and comes back ahead of that layer's
//! backward.
//!
//! All copies run on one side stream, in order, while the compute stream goes on:
//! - forward: the copy of layer i's input starts as soon as it is produced and runs beside layer
//!   i's forward; the compute stream waits for it only after enqueueing that forward, right
//!   before the input's memory is freed (the stream-ordered allocator reuses it after that wait);
//! - backward: layer i − 1's input is fetched while layer i is recomputed and differentiated
//!   (two inputs on the device at most), and the compute stream waits for it just before it is
//!   needed.
//!
//! Pinned buffers are kept for the next micro-batch (allocating pinned memory is slow).

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{result, CudaEvent, CudaStream};
use candle_core::{DType, Shape, Tensor};

use crate::error::{KilnError, Result};

/// A page-locked host buffer (never freed: reused across micro-batches).
struct HostBuffer {
    ptr: usize,
    bytes: usize,
}

/// Pinned buffers free for reuse.
static POOL: Mutex<Vec<HostBuffer>> = Mutex::new(Vec::new());

fn take_buffer(bytes: usize) -> Result<HostBuffer> {
    let mut pool = POOL.lock().expect("pool");
    if let Some(i) = pool.iter().position(|b| b.bytes >= bytes) {
        return Ok(pool.swap_remove(i));
    }
    // A buffer too small for these rows is freed and a larger one made (rounded to 64 MiB, so
    // rows of nearby lengths share buffers).
    if let Some(small) = pool.pop() {
        // SAFETY: the buffer came from malloc_host and no copy uses it (it is in the pool).
        unsafe { result::free_host(small.ptr as *mut std::ffi::c_void) }
            .map_err(|e| KilnError::Train(format!("freeing pinned memory: {e}")))?;
    }
    let bytes = bytes.next_multiple_of(64 << 20);
    // SAFETY: plain page-locked allocation; the contents are written by the copy before use.
    let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| {
        KilnError::Train(format!(
            "offloaded checkpoints: cannot pin {:.1} GiB of host memory ({e}); use gradient_checkpointing = true",
            bytes as f64 / (1u64 << 30) as f64
        ))
    })?;
    Ok(HostBuffer {
        ptr: ptr as usize,
        bytes,
    })
}

/// The side stream of the device (one per device, made on first use).
fn side_stream(main: &Arc<CudaStream>) -> Result<Arc<CudaStream>> {
    static STREAMS: Mutex<Vec<(usize, Arc<CudaStream>)>> = Mutex::new(Vec::new());
    let ordinal = main.context().ordinal();
    let mut streams = STREAMS.lock().expect("streams");
    if let Some((_, s)) = streams.iter().find(|(o, _)| *o == ordinal) {
        return Ok(s.clone());
    }
    let s = main
        .context()
        .new_stream()
        .map_err(|e| KilnError::Train(format!("offloaded checkpoints: a copy stream: {e}")))?;
    streams.push((ordinal, s.clone()));
    Ok(s)
}

fn driver<T>(r: std::result::Result<T, result::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| KilnError::Train(format!("offloaded checkpoints: {what}: {e}")))
}

/// A layer input on its way to, or in, host memory.
pub(crate) struct Stored {
    host: Option<HostBuffer>,
    shape: Shape,
    dtype: DType,
    bytes: usize,
    /// Recorded on the side stream after the copy to the host.
    copied: CudaEvent,
    /// The device tensor, alive until [`Offload::release`].
    device: Option<Tensor>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Some(b) = self.host.take() {
            // Any copy from this buffer is ordered on the side stream before the next copy into
            // it, so it can be reused at once.
            POOL.lock().expect("pool").push(b);
        }
    }
}

/// A layer input on its way back to the device.
pub(crate) struct Fetched {
    tensor: Tensor,
    done: CudaEvent,
}

/// The copies of one micro-batch.
pub(crate) struct Offload {
    device: candle_core::CudaDevice,
    main: Arc<CudaStream>,
    side: Arc<CudaStream>,
}

impl Offload {
    pub fn new(device: &candle_core::Device) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            return Err(KilnError::Train(
                "offloaded checkpoints need a CUDA device".into(),
            ));
        };
        let main = dev.cuda_stream();
        let side = side_stream(&main)?;
        Ok(Self {
            device: dev.clone(),
            main,
            side,
        })
    }

    /// Starts copying `x` (contiguous) to the host, after the work that produced it.
    pub fn store(&self, x: &Tensor) -> Result<Stored> {
        let x = x.contiguous()?;
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        let host = take_buffer(bytes)?;
        let produced = driver(self.main.record_event(None), "an event")?;
        driver(self.side.wait(&produced), "waiting")?;
        let src = crate::cuda::device_address(&x, "offload")?;
        // SAFETY: `src` holds `bytes` bytes on this device, alive until `release` (the compute
        // stream waits for `copied` before freeing it); the host buffer holds at least `bytes`.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(host.ptr as *mut u8, bytes);
            driver(
                result::memcpy_dtoh_async(dst, src, self.side.cu_stream()),
                "a copy to the host",
            )?;
        }
        let copied = driver(self.side.record_event(None), "an event")?;
        Ok(Stored {
            host: Some(host),
            shape: x.shape().clone(),
            dtype: x.dtype(),
            bytes,
            copied,
            device: Some(x),
        })
    }

    /// Lets the device copy go: the compute stream waits for the host copy first.
    pub fn release(&self, stored: &mut Stored) -> Result<()> {
        driver(self.main.wait(&stored.copied), "waiting")?;
        stored.device = None;
        Ok(())
    }

    /// Starts bringing `stored` back to the device.
    pub fn fetch(&self, stored: &Stored) -> Result<Fetched> {
        let tensor = crate::cuda::uninit(&self.device, stored.dtype, stored.shape.clone())?;
        // The allocation is ordered on the compute stream; the copy waits for it.
        let allocated = driver(self.main.record_event(None), "an event")?;
        driver(self.side.wait(&allocated), "waiting")?;
        let dst = crate::cuda::device_address(&tensor, "offload")?;
        let host = stored.host.as_ref().expect("stored on the host");
        // SAFETY: `dst` holds `bytes` bytes; the host buffer was filled by the earlier copy on
        // this same stream.
        unsafe {
            let src = std::slice::from_raw_parts(host.ptr as *const u8, stored.bytes);
            driver(
                result::memcpy_htod_async(dst, src, self.side.cu_stream()),
                "a copy to the device",
            )?;
        }
        let done = driver(self.side.record_event(None), "an event")?;
        Ok(Fetched { tensor, done })
    }

    /// The fetched tensor, once the compute stream has waited for its copy.
    pub fn ready(&self, fetched: Fetched) -> Result<Tensor> {
        driver(self.main.wait(&fetched.done), "waiting")?;
        Ok(fetched.tensor)
    }
}

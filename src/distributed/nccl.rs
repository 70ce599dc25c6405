//! NCCL, loaded at run time (`libnccl.so.2`), so a single-GPU user needs no NCCL: the handful of
//! calls data-parallel training makes — a unique id, a communicator per rank, a sum and a
//! broadcast. The collectives run on the device's one stream, ordered with
//! every kernel around them.
//!
//! (cudarc has NCCL bindings, but candle builds cudarc with `dynamic-linking`, which would link
//! libnccl into every CUDA build of kiln.)

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::rendezvous::ID_BYTES;
use super::Collective;
use crate::error::{KilnError, Result};

type NcclResult = c_int;
type Comm = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([u8; ID_BYTES]);

const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
/// `ncclInProgress`: an asynchronous error check that found the communicator still busy.
const NCCL_IN_PROGRESS: NcclResult = 7;

struct Api {
    _lib: libloading::Library,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> NcclResult,
    comm_async_error: unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

impl Api {
    fn load() -> std::result::Result<Api, String> {
        let names: Vec<String> = match std::env::var("KILN_NCCL_LIB") {
            Ok(path) => vec![path],
            Err(_) => vec!["libnccl.so.2".into(), "libnccl.so".into()],
        };
        let mut errors = vec![];
        for name in &names {
            // SAFETY: loading NCCL runs its initializers, which have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::resolve(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    fn resolve(lib: libloading::Library) -> std::result::Result<Api, libloading::Error> {
        // SAFETY: the signatures are those of NCCL 2's C API (nccl.h).
        unsafe {
            Ok(Api {
                get_version: *lib.get(b"ncclGetVersion")?,
                get_unique_id: *lib.get(b"ncclGetUniqueId")?,
                comm_init_rank: *lib.get(b"ncclCommInitRank")?,
                all_reduce: *lib.get(b"ncclAllReduce")?,
                broadcast: *lib.get(b"ncclBroadcast")?,
                comm_async_error: *lib.get(b"ncclCommGetAsyncError")?,
                error_string: *lib.get(b"ncclGetErrorString")?,
                _lib: lib,
            })
        }
    }

    fn check(&self, r: NcclResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result.
        let msg = unsafe { CStr::from_ptr((self.error_string)(r)) }.to_string_lossy();
        Err(KilnError::Train(format!(
            "NCCL {what}: {msg} ({r}); NCCL_DEBUG=INFO shows NCCL's own account"
        )))
    }
}

/// The library, loaded on first use.
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        // Multicast (NVLS) off unless the user chose otherwise: README, "Several GPUs".
        for (k, v) in super::launch::MULTICAST_OFF {
            if std::env::var_os(k).is_none() {
                // SAFETY: set before NCCL starts its threads, while this is the only thread
                // that reads the environment.
                unsafe { std::env::set_var(k, v) };
            }
        }
        Api::load()
    })
    .as_ref()
    .map_err(|e| {
        KilnError::Train(format!(
            "several GPUs need NCCL 2, which could not be loaded ({e}); install it (e.g. the libnccl2 package, or pip's nvidia-nccl-cu12/cu13 and KILN_NCCL_LIB=<path to libnccl.so.2>)"
        ))
    })
}

/// NCCL's version as `major.minor.patch`.
pub fn version() -> Result<String> {
    let api = api()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    api.check(unsafe { (api.get_version)(&mut v) }, "version")?;
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// A fresh unique id (rank 0 makes it; the rendezvous hands it to the others).
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let api = api()?;
    let mut id = UniqueId([0; ID_BYTES]);
    // SAFETY: writes the 128-byte id.
    api.check(unsafe { (api.get_unique_id)(&mut id) }, "unique id")?;
    Ok(id.0)
}

/// One rank's NCCL communicator, on its device's stream.
pub struct NcclCollective {
    comm: usize,
    rank: usize,
    size: usize,
    device: Device,
}

// SAFETY: the communicator is used from the training thread only.
unsafe impl Send for NcclCollective {}
unsafe impl Sync for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator of `size` ranks named by `id`, on `device` (every rank calls this
    /// with the same id; it returns once all have).
    pub fn new(device: &Device, id: [u8; ID_BYTES], rank: usize, size: usize) -> Result<Self> {
        if !device.is_cuda() {
            return Err(KilnError::Train("NCCL needs a CUDA device".into()));
        }
        let api = api()?;
        crate::cuda::stream_handle(device)
            .map_err(|e| KilnError::Train(format!("NCCL: binding the CUDA context: {e}")))?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is the one rank 0 made.
        api.check(
            unsafe { (api.comm_init_rank)(&mut comm, size as c_int, UniqueId(id), rank as c_int) },
            &format!("joining the communicator as rank {rank} of {size}"),
        )?;
        Ok(Self {
            comm: comm as usize,
            rank,
            size,
            device: device.clone(),
        })
    }

    fn run(
        &self,
        x: &Tensor,
        what: &str,
        call: impl FnOnce(&Api, *const c_void, *mut c_void, usize, *mut c_void) -> NcclResult,
    ) -> Result<Tensor> {
        let api = api()?;
        let home = x.device().clone();
        let x = x
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .contiguous()?;
        let n = x.elem_count();
        let out = crate::cuda::uninit_like(&x, n)?;
        let send = crate::cuda::device_address(&x, what)? as *const c_void;
        let recv = crate::cuda::device_address(&out, what)? as *mut c_void;
        let stream = crate::cuda::stream_handle(&self.device)?;
        api.check(call(api, send, recv, n, stream), what)?;
        self.check_health()?;
        Ok(out.to_device(&home)?)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let comm = self.comm as Comm;
        self.run(x, "all-reduce", |api, send, recv, n, stream| {
            // SAFETY: `send` and `recv` hold `n` f32 on this device; the call is ordered on
            // the stream every kernel runs on.
            unsafe { (api.all_reduce)(send, recv, n, NCCL_FLOAT32, NCCL_SUM, comm, stream) }
        })
    }
    fn check_health(&self) -> Result<()> {
        let api = api()?;
        let mut state: NcclResult = 0;
        // SAFETY: reads the communicator's asynchronous error (e.g. a peer's failure).
        unsafe { (api.comm_async_error)(self.comm as Comm, &mut state) };
        if state != 0 && state != NCCL_IN_PROGRESS {
            api.check(state, "a collective")?;
        }
        Ok(())
    }
    fn broadcast(&self, x: &Tensor) -> Result<Tensor> {
        let comm = self.comm as Comm;
        self.run(x, "broadcast", |api, send, recv, n, stream| {
            // SAFETY: as above; rank 0 is the root.
            unsafe { (api.broadcast)(send, recv, n, NCCL_FLOAT32, 0, comm, stream) }
        })
    }
}

//! cuDNN's graph API, loaded at run time (`libcudnn.so.9`, as NCCL is): a few backend
//! functions and descriptors that free themselves (the graphs built from them:
//! src/cuda/cudnn_graph.rs; the attention graphs: src/cuda/cudnn_attention.rs). Machines without cuDNN get `None` from
//! [`Cudnn::get`] and keep kiln's own kernels.
//!
//! The backend API is a C interface of opaque descriptors with typed attributes; the numeric
//! values below are the ones `cudnn_backend.h` / `cudnn_graph.h` (cuDNN 9) define.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use candle_core::{bail, Result};

type Status = i32;
pub(super) type RawDesc = *mut c_void;

/// Descriptor kinds (`cudnnBackendDescriptorType_t`).
pub(crate) mod kind {
    pub const POINTWISE: u32 = 0;
    pub const ENGINECFG: u32 = 3;
    pub const ENGINEHEUR: u32 = 4;
    pub const EXECUTION_PLAN: u32 = 5;
    pub const OPERATION_POINTWISE: u32 = 13;
    pub const OPERATIONGRAPH: u32 = 15;
    pub const VARIANT_PACK: u32 = 16;
    pub const TENSOR: u32 = 17;
    pub const MATMUL: u32 = 18;
    pub const OPERATION_MATMUL: u32 = 19;
    pub const REDUCTION: u32 = 21;
    pub const OPERATION_REDUCTION: u32 = 22;
    pub const OPERATION_RESHAPE: u32 = 31;
}

/// Attribute value types (`cudnnBackendAttributeType_t`).
pub(super) mod ty {
    pub const HANDLE: u32 = 0;
    pub const DATA_TYPE: u32 = 1;
    pub const BOOLEAN: u32 = 2;
    pub const INT64: u32 = 3;
    pub const VOID_PTR: u32 = 6;
    pub const HEUR_MODE: u32 = 8;
    pub const POINTWISE_MODE: u32 = 14;
    pub const BACKEND_DESCRIPTOR: u32 = 15;
    pub const REDUCTION_OPERATOR: u32 = 18;
}

/// Attribute names (`cudnnBackendAttributeName_t`).
pub(super) mod attr {
    pub const POINTWISE_MODE: u32 = 0;
    pub const POINTWISE_MATH_PREC: u32 = 1;
    pub const POINTWISE_AXIS: u32 = 9;
    pub const ENGINEHEUR_MODE: u32 = 200;
    pub const ENGINEHEUR_OPERATION_GRAPH: u32 = 201;
    pub const ENGINEHEUR_RESULTS: u32 = 202;
    pub const EXECUTION_PLAN_HANDLE: u32 = 400;
    pub const EXECUTION_PLAN_ENGINE_CONFIG: u32 = 401;
    pub const EXECUTION_PLAN_WORKSPACE_SIZE: u32 = 402;
    pub const OPERATION_POINTWISE_PW_DESCRIPTOR: u32 = 750;
    pub const OPERATION_POINTWISE_XDESC: u32 = 751;
    pub const OPERATION_POINTWISE_BDESC: u32 = 752;
    pub const OPERATION_POINTWISE_YDESC: u32 = 753;
    pub const OPERATION_POINTWISE_TDESC: u32 = 758;
    pub const OPERATIONGRAPH_HANDLE: u32 = 800;
    pub const OPERATIONGRAPH_OPS: u32 = 801;
    pub const TENSOR_BYTE_ALIGNMENT: u32 = 900;
    pub const TENSOR_DATA_TYPE: u32 = 901;
    pub const TENSOR_DIMENSIONS: u32 = 902;
    pub const TENSOR_STRIDES: u32 = 903;
    pub const TENSOR_UNIQUE_ID: u32 = 906;
    pub const TENSOR_IS_VIRTUAL: u32 = 907;
    pub const TENSOR_IS_BY_VALUE: u32 = 908;
    pub const VARIANT_PACK_UNIQUE_IDS: u32 = 1000;
    pub const VARIANT_PACK_DATA_POINTERS: u32 = 1001;
    pub const VARIANT_PACK_WORKSPACE: u32 = 1003;
    pub const MATMUL_COMP_TYPE: u32 = 1500;
    pub const OPERATION_MATMUL_ADESC: u32 = 1520;
    pub const OPERATION_MATMUL_BDESC: u32 = 1521;
    pub const OPERATION_MATMUL_CDESC: u32 = 1522;
    pub const OPERATION_MATMUL_DESC: u32 = 1523;
    pub const REDUCTION_OPERATOR: u32 = 1600;
    pub const REDUCTION_COMP_TYPE: u32 = 1601;
    pub const OPERATION_REDUCTION_XDESC: u32 = 1610;
    pub const OPERATION_REDUCTION_YDESC: u32 = 1611;
    pub const OPERATION_REDUCTION_DESC: u32 = 1612;
    pub const OPERATION_RESHAPE_XDESC: u32 = 2200;
    pub const OPERATION_RESHAPE_YDESC: u32 = 2201;
}

/// Element types (`cudnnDataType_t`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub(crate) enum DataType {
    F32 = 0,
    I32 = 4,
    BF16 = 9,
    Bool = 11,
}

/// Pointwise modes (`cudnnPointwiseMode_t`).
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub(crate) enum Pointwise {
    Add = 0,
    Mul = 1,
    Div = 6,
    Sub = 9,
    Exp = 13,
    Log = 15,
    Identity = 21,
    CmpGe = 303,
    GenIndex = 501,
    BinarySelect = 601,
}

/// Reductions (`cudnnReduceTensorOp_t`).
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub(crate) enum Reduce {
    Add = 0,
    Max = 3,
}

pub(super) const HEUR_MODE_A: u32 = 3;

/// The backend functions kiln calls, from the library loaded at run time.
struct Api {
    _lib: libloading::Library,
    create: unsafe extern "C" fn(*mut *mut c_void) -> Status,
    set_stream: unsafe extern "C" fn(*mut c_void, *mut c_void) -> Status,
    get_version: unsafe extern "C" fn() -> usize,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    last_error: unsafe extern "C" fn(*mut c_char, usize),
    create_descriptor: unsafe extern "C" fn(u32, *mut RawDesc) -> Status,
    destroy_descriptor: unsafe extern "C" fn(RawDesc) -> Status,
    finalize: unsafe extern "C" fn(RawDesc) -> Status,
    set_attribute: unsafe extern "C" fn(RawDesc, u32, u32, i64, *const c_void) -> Status,
    get_attribute: unsafe extern "C" fn(RawDesc, u32, u32, i64, *mut i64, *mut c_void) -> Status,
    execute: unsafe extern "C" fn(*mut c_void, RawDesc, RawDesc) -> Status,
}

impl Api {
    /// `KILN_CUDNN_LIB` if set, else the names the dynamic loader resolves.
    fn load() -> std::result::Result<Api, String> {
        let names: Vec<String> = match std::env::var("KILN_CUDNN_LIB") {
            Ok(path) => vec![path],
            Err(_) => vec!["libcudnn.so.9".into(), "libcudnn.so".into()],
        };
        let mut errors = vec![];
        for name in &names {
            // SAFETY: loading cuDNN runs its initializers, which have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::resolve(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    fn resolve(lib: libloading::Library) -> std::result::Result<Api, libloading::Error> {
        // SAFETY: the signatures are those of cuDNN 9's C API.
        unsafe {
            Ok(Api {
                create: *lib.get(b"cudnnCreate")?,
                set_stream: *lib.get(b"cudnnSetStream")?,
                get_version: *lib.get(b"cudnnGetVersion")?,
                error_string: *lib.get(b"cudnnGetErrorString")?,
                last_error: *lib.get(b"cudnnGetLastErrorString")?,
                create_descriptor: *lib.get(b"cudnnBackendCreateDescriptor")?,
                destroy_descriptor: *lib.get(b"cudnnBackendDestroyDescriptor")?,
                finalize: *lib.get(b"cudnnBackendFinalize")?,
                set_attribute: *lib.get(b"cudnnBackendSetAttribute")?,
                get_attribute: *lib.get(b"cudnnBackendGetAttribute")?,
                execute: *lib.get(b"cudnnBackendExecute")?,
                _lib: lib,
            })
        }
    }

    fn check(&self, status: Status, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: cuDNN returns a static string for every status.
        let name = unsafe { CStr::from_ptr((self.error_string)(status)) }.to_string_lossy();
        let mut buf = [0 as c_char; 512];
        // SAFETY: the buffer's length is passed.
        unsafe { (self.last_error)(buf.as_mut_ptr(), buf.len()) };
        let detail = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        bail!("cuDNN {what}: {name} ({status}) {detail}")
    }
}

/// The loaded library and one handle per CUDA stream kiln runs on.
pub(crate) struct Cudnn {
    api: Api,
    handles: Mutex<HashMap<usize, usize>>,
}

// SAFETY: cuDNN handles are used under the mutex or on the one stream they are bound to.
unsafe impl Send for Cudnn {}
unsafe impl Sync for Cudnn {}

impl Cudnn {
    /// The library, loaded once; `None` where it is missing or `KILN_CUDNN=0` turns it off.
    pub fn get() -> Option<&'static Cudnn> {
        static LIB: OnceLock<Option<Cudnn>> = OnceLock::new();
        LIB.get_or_init(|| {
            if std::env::var("KILN_CUDNN").is_ok_and(|v| v == "0") {
                return None;
            }
            let api = Api::load().ok()?;
            // SAFETY: no arguments.
            let version = unsafe { (api.get_version)() };
            // The fused attention graphs below need cuDNN 9.6 or later (dQ accumulated inside
            // the engine).
            (version >= 90600).then(|| Cudnn {
                api,
                handles: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
    }

    /// cuDNN's version number (9.14.0 is 91400).
    pub fn version(&self) -> usize {
        // SAFETY: no arguments.
        unsafe { (self.api.get_version)() }
    }

    /// The handle bound to `stream` (created on first use).
    pub fn handle(&self, stream: *mut c_void) -> Result<*mut c_void> {
        let mut handles = self.handles.lock().unwrap();
        if let Some(&h) = handles.get(&(stream as usize)) {
            return Ok(h as *mut c_void);
        }
        let mut h = std::ptr::null_mut();
        // SAFETY: out-pointer to a handle.
        self.api
            .check(unsafe { (self.api.create)(&mut h) }, "create handle")?;
        self.api
            .check(unsafe { (self.api.set_stream)(h, stream) }, "set stream")?;
        handles.insert(stream as usize, h as usize);
        Ok(h)
    }

    pub(super) fn descriptor(&'static self, kind: u32) -> Result<Descriptor> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: out-pointer to a descriptor.
        self.api.check(
            unsafe { (self.api.create_descriptor)(kind, &mut raw) },
            "create descriptor",
        )?;
        Ok(Descriptor { raw, cudnn: self })
    }
}

/// A backend descriptor, destroyed on drop.
pub(crate) struct Descriptor {
    pub(super) raw: RawDesc,
    pub(super) cudnn: &'static Cudnn,
}

// SAFETY: a descriptor is host data of cuDNN's; once finalized kiln only reads it (plans are
// executed under the plan cache's lock or from the thread that owns the stream).
unsafe impl Send for Descriptor {}
unsafe impl Sync for Descriptor {}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor and not yet destroyed.
        unsafe { (self.cudnn.api.destroy_descriptor)(self.raw) };
    }
}

impl Descriptor {
    pub(super) fn set<T>(&self, name: u32, ty: u32, values: &[T], what: &str) -> Result<()> {
        // SAFETY: `values` holds `len` elements of the C type `ty` names.
        let status = unsafe {
            (self.cudnn.api.set_attribute)(
                self.raw,
                name,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        };
        self.cudnn.api.check(status, what)
    }

    pub(super) fn set_descriptors(
        &self,
        name: u32,
        descs: &[&Descriptor],
        what: &str,
    ) -> Result<()> {
        let raws: Vec<RawDesc> = descs.iter().map(|d| d.raw).collect();
        self.set(name, ty::BACKEND_DESCRIPTOR, &raws, what)
    }

    pub(super) fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: a descriptor of ours.
        let status = unsafe { (self.cudnn.api.finalize)(self.raw) };
        self.cudnn.api.check(status, what)
    }

    /// Reads up to `out.len()` values of attribute `name` (of C type `ty`); returns how many.
    pub(super) fn get<T>(&self, name: u32, ty: u32, out: &mut [T], what: &str) -> Result<usize> {
        let mut count = 0i64;
        // SAFETY: `out` has room for `len` elements of the C type `ty` names.
        let status = unsafe {
            (self.cudnn.api.get_attribute)(
                self.raw,
                name,
                ty,
                out.len() as i64,
                &mut count,
                out.as_mut_ptr() as *mut c_void,
            )
        };
        self.cudnn.api.check(status, what)?;
        Ok(count as usize)
    }

    /// Executes this execution plan with `pack` on `handle`'s stream.
    pub(super) fn execute(&self, handle: *mut c_void, pack: &Descriptor) -> Result<()> {
        // SAFETY: both are finalized descriptors of ours; what the pack points to is live for
        // the work, which runs in order on the handle's stream.
        let status = unsafe { (self.cudnn.api.execute)(handle, self.raw, pack.raw) };
        self.cudnn.api.check(status, "execute")
    }
}

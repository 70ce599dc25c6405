//! cuDNN's graph API, loaded at run time (`libcudnn.so.9`, as NCCL is): a few backend
//! functions, descriptors that free themselves, and a builder for the small operation graphs kiln
//! asks cuDNN to fuse (src/cuda/cudnn_attention.rs). Machines without cuDNN get `None` from
//! [`Cudnn::get`] and keep kiln's own kernels.
//!
//! The backend API is a C interface of opaque descriptors with typed attributes; the numeric
//! values below are the ones `cudnn_backend.h` / `cudnn_graph.h` (cuDNN 9) define.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use candle_core::{bail, Result};

type Status = i32;
type RawDesc = *mut c_void;

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
mod ty {
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
mod attr {
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

const HEUR_MODE_A: u32 = 3;

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

    fn descriptor(&'static self, kind: u32) -> Result<Descriptor> {
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
    raw: RawDesc,
    cudnn: &'static Cudnn,
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
    fn set<T>(&self, name: u32, ty: u32, values: &[T], what: &str) -> Result<()> {
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

    fn set_descriptors(&self, name: u32, descs: &[&Descriptor], what: &str) -> Result<()> {
        let raws: Vec<RawDesc> = descs.iter().map(|d| d.raw).collect();
        self.set(name, ty::BACKEND_DESCRIPTOR, &raws, what)
    }

    fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: a descriptor of ours.
        let status = unsafe { (self.cudnn.api.finalize)(self.raw) };
        self.cudnn.api.check(status, what)
    }
}

/// A tensor of a graph being built: its index in [`GraphBuilder`]'s list, and its shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GraphTensor {
    index: usize,
    pub dims: [i64; 4],
}

/// Row-major strides of `dims`.
pub(crate) fn packed_strides(dims: [i64; 4]) -> [i64; 4] {
    [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
}

/// An operation graph under construction: tensors (real ones carry the unique ids the variant
/// pack names at execution; virtual ones live inside the fused kernel) and operations.
pub(crate) struct GraphBuilder {
    cudnn: &'static Cudnn,
    tensors: Vec<Descriptor>,
    ops: Vec<Descriptor>,
    /// Descriptors the operations refer to (pointwise, matmul and reduction settings).
    settings: Vec<Descriptor>,
    next_virtual_uid: i64,
}

impl GraphBuilder {
    pub fn new(cudnn: &'static Cudnn) -> Self {
        GraphBuilder {
            cudnn,
            tensors: vec![],
            ops: vec![],
            settings: vec![],
            next_virtual_uid: 1000,
        }
    }

    fn tensor(
        &mut self,
        uid: i64,
        dims: [i64; 4],
        strides: [i64; 4],
        dtype: DataType,
        is_virtual: bool,
        by_value: bool,
    ) -> Result<GraphTensor> {
        let d = self.cudnn.descriptor(kind::TENSOR)?;
        d.set(
            attr::TENSOR_DATA_TYPE,
            ty::DATA_TYPE,
            &[dtype as u32],
            "tensor type",
        )?;
        d.set(attr::TENSOR_DIMENSIONS, ty::INT64, &dims, "tensor dims")?;
        d.set(attr::TENSOR_STRIDES, ty::INT64, &strides, "tensor strides")?;
        d.set(attr::TENSOR_UNIQUE_ID, ty::INT64, &[uid], "tensor id")?;
        d.set(
            attr::TENSOR_BYTE_ALIGNMENT,
            ty::INT64,
            &[16i64],
            "tensor alignment",
        )?;
        d.set(
            attr::TENSOR_IS_VIRTUAL,
            ty::BOOLEAN,
            &[is_virtual],
            "virtual",
        )?;
        if by_value {
            d.set(attr::TENSOR_IS_BY_VALUE, ty::BOOLEAN, &[true], "by value")?;
        }
        d.finalize("tensor")?;
        self.tensors.push(d);
        Ok(GraphTensor {
            index: self.tensors.len() - 1,
            dims,
        })
    }

    /// A tensor in device memory, named `uid` in the variant pack.
    pub fn real(
        &mut self,
        uid: i64,
        dims: [i64; 4],
        strides: [i64; 4],
        dtype: DataType,
    ) -> Result<GraphTensor> {
        self.tensor(uid, dims, strides, dtype, false, false)
    }

    /// An f32 scalar passed by value (a host pointer in the variant pack).
    pub fn scalar(&mut self, uid: i64) -> Result<GraphTensor> {
        self.tensor(uid, [1; 4], [1; 4], DataType::F32, false, true)
    }

    /// An intermediate that never reaches memory.
    pub fn virtual_tensor(
        &mut self,
        dims: [i64; 4],
        strides: [i64; 4],
        dtype: DataType,
    ) -> Result<GraphTensor> {
        self.next_virtual_uid += 1;
        self.tensor(self.next_virtual_uid, dims, strides, dtype, true, false)
    }

    /// A virtual f32 tensor of the broadcast shape of `a` and `b`.
    fn broadcast_output(&mut self, a: GraphTensor, b: Option<GraphTensor>) -> Result<GraphTensor> {
        let mut dims = a.dims;
        if let Some(b) = b {
            for (d, e) in dims.iter_mut().zip(b.dims) {
                *d = (*d).max(e);
            }
        }
        self.virtual_tensor(dims, packed_strides(dims), DataType::F32)
    }

    /// `y = mode(x, b, t)` into an existing tensor `y`, computed in `compute`.
    pub fn pointwise_into(
        &mut self,
        mode: Pointwise,
        x: GraphTensor,
        b: Option<GraphTensor>,
        t: Option<GraphTensor>,
        y: GraphTensor,
        compute: DataType,
    ) -> Result<()> {
        let pw = self.cudnn.descriptor(kind::POINTWISE)?;
        pw.set(
            attr::POINTWISE_MODE,
            ty::POINTWISE_MODE,
            &[mode as u32],
            "pointwise mode",
        )?;
        pw.set(
            attr::POINTWISE_MATH_PREC,
            ty::DATA_TYPE,
            &[compute as u32],
            "math precision",
        )?;
        pw.finalize("pointwise")?;
        let op = self.cudnn.descriptor(kind::OPERATION_POINTWISE)?;
        op.set_descriptors(attr::OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw], "pw")?;
        op.set_descriptors(
            attr::OPERATION_POINTWISE_XDESC,
            &[&self.tensors[x.index]],
            "x",
        )?;
        if let Some(b) = b {
            op.set_descriptors(
                attr::OPERATION_POINTWISE_BDESC,
                &[&self.tensors[b.index]],
                "b",
            )?;
        }
        if let Some(t) = t {
            op.set_descriptors(
                attr::OPERATION_POINTWISE_TDESC,
                &[&self.tensors[t.index]],
                "t",
            )?;
        }
        op.set_descriptors(
            attr::OPERATION_POINTWISE_YDESC,
            &[&self.tensors[y.index]],
            "y",
        )?;
        op.finalize(&format!("pointwise {mode:?}"))?;
        self.settings.push(pw);
        self.ops.push(op);
        Ok(())
    }

    /// `mode(x)` or `mode(x, b)` into a new virtual f32 tensor.
    pub fn pointwise(
        &mut self,
        mode: Pointwise,
        x: GraphTensor,
        b: Option<GraphTensor>,
    ) -> Result<GraphTensor> {
        let y = self.broadcast_output(x, b)?;
        self.pointwise_into(mode, x, b, None, y, DataType::F32)?;
        Ok(y)
    }

    /// Each element's index along `axis` of `like`'s shape (int32).
    pub fn index(&mut self, like: GraphTensor, axis: i64) -> Result<GraphTensor> {
        let y = self.virtual_tensor(like.dims, packed_strides(like.dims), DataType::I32)?;
        let pw = self.cudnn.descriptor(kind::POINTWISE)?;
        pw.set(
            attr::POINTWISE_MODE,
            ty::POINTWISE_MODE,
            &[Pointwise::GenIndex as u32],
            "mode",
        )?;
        pw.set(
            attr::POINTWISE_MATH_PREC,
            ty::DATA_TYPE,
            &[DataType::F32 as u32],
            "prec",
        )?;
        pw.set(attr::POINTWISE_AXIS, ty::INT64, &[axis], "axis")?;
        pw.finalize("gen index")?;
        let op = self.cudnn.descriptor(kind::OPERATION_POINTWISE)?;
        op.set_descriptors(attr::OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw], "pw")?;
        op.set_descriptors(
            attr::OPERATION_POINTWISE_XDESC,
            &[&self.tensors[like.index]],
            "x",
        )?;
        op.set_descriptors(
            attr::OPERATION_POINTWISE_YDESC,
            &[&self.tensors[y.index]],
            "y",
        )?;
        op.finalize("gen index op")?;
        self.settings.push(pw);
        self.ops.push(op);
        Ok(y)
    }

    /// `c = a · b` over the last two dimensions (batched over the first two), f32 accumulation.
    pub fn matmul(&mut self, a: GraphTensor, b: GraphTensor, c: GraphTensor) -> Result<()> {
        let mm = self.cudnn.descriptor(kind::MATMUL)?;
        mm.set(
            attr::MATMUL_COMP_TYPE,
            ty::DATA_TYPE,
            &[DataType::F32 as u32],
            "matmul type",
        )?;
        mm.finalize("matmul")?;
        let op = self.cudnn.descriptor(kind::OPERATION_MATMUL)?;
        op.set_descriptors(attr::OPERATION_MATMUL_ADESC, &[&self.tensors[a.index]], "a")?;
        op.set_descriptors(attr::OPERATION_MATMUL_BDESC, &[&self.tensors[b.index]], "b")?;
        op.set_descriptors(attr::OPERATION_MATMUL_CDESC, &[&self.tensors[c.index]], "c")?;
        op.set_descriptors(attr::OPERATION_MATMUL_DESC, &[&mm], "desc")?;
        op.finalize("matmul op")?;
        self.settings.push(mm);
        self.ops.push(op);
        Ok(())
    }

    /// `y = reduce(x)` over the dimensions where `y` has size 1 and `x` does not.
    pub fn reduce(&mut self, reduce: Reduce, x: GraphTensor, y: GraphTensor) -> Result<()> {
        let r = self.cudnn.descriptor(kind::REDUCTION)?;
        r.set(
            attr::REDUCTION_OPERATOR,
            ty::REDUCTION_OPERATOR,
            &[reduce as u32],
            "reduce",
        )?;
        r.set(
            attr::REDUCTION_COMP_TYPE,
            ty::DATA_TYPE,
            &[DataType::F32 as u32],
            "type",
        )?;
        r.finalize("reduction")?;
        let op = self.cudnn.descriptor(kind::OPERATION_REDUCTION)?;
        op.set_descriptors(
            attr::OPERATION_REDUCTION_XDESC,
            &[&self.tensors[x.index]],
            "x",
        )?;
        op.set_descriptors(
            attr::OPERATION_REDUCTION_YDESC,
            &[&self.tensors[y.index]],
            "y",
        )?;
        op.set_descriptors(attr::OPERATION_REDUCTION_DESC, &[&r], "desc")?;
        op.finalize(&format!("reduction {reduce:?}"))?;
        self.settings.push(r);
        self.ops.push(op);
        Ok(())
    }

    /// `y` as another view of `x` (a transpose by strides).
    pub fn reshape(&mut self, x: GraphTensor, y: GraphTensor) -> Result<()> {
        let op = self.cudnn.descriptor(kind::OPERATION_RESHAPE)?;
        op.set_descriptors(
            attr::OPERATION_RESHAPE_XDESC,
            &[&self.tensors[x.index]],
            "x",
        )?;
        op.set_descriptors(
            attr::OPERATION_RESHAPE_YDESC,
            &[&self.tensors[y.index]],
            "y",
        )?;
        op.finalize("reshape")?;
        self.ops.push(op);
        Ok(())
    }

    /// The operation graph, the first engine configuration cuDNN's heuristics rank that
    /// finalizes for it, and its execution plan.
    pub fn build(self, handle: *mut c_void) -> Result<Plan> {
        let cudnn = self.cudnn;
        let graph = cudnn.descriptor(kind::OPERATIONGRAPH)?;
        graph.set(
            attr::OPERATIONGRAPH_HANDLE,
            ty::HANDLE,
            &[handle],
            "graph handle",
        )?;
        let ops: Vec<&Descriptor> = self.ops.iter().collect();
        graph.set_descriptors(attr::OPERATIONGRAPH_OPS, &ops, "graph ops")?;
        graph.finalize("operation graph")?;

        let heur = cudnn.descriptor(kind::ENGINEHEUR)?;
        heur.set_descriptors(attr::ENGINEHEUR_OPERATION_GRAPH, &[&graph], "heur graph")?;
        heur.set(
            attr::ENGINEHEUR_MODE,
            ty::HEUR_MODE,
            &[HEUR_MODE_A],
            "heur mode",
        )?;
        heur.finalize("heuristics")?;
        let configs: Vec<Descriptor> = (0..8)
            .map(|_| cudnn.descriptor(kind::ENGINECFG))
            .collect::<Result<_>>()?;
        let mut raws: Vec<RawDesc> = configs.iter().map(|c| c.raw).collect();
        let mut count = 0i64;
        // SAFETY: `raws` holds `len` created engine-config descriptors for cuDNN to fill.
        let status = unsafe {
            (cudnn.api.get_attribute)(
                heur.raw,
                attr::ENGINEHEUR_RESULTS,
                ty::BACKEND_DESCRIPTOR,
                raws.len() as i64,
                &mut count,
                raws.as_mut_ptr() as *mut c_void,
            )
        };
        cudnn.api.check(status, "heuristics results")?;
        let mut errors = vec![];
        for config in configs.iter().take(count as usize) {
            let plan = cudnn.descriptor(kind::EXECUTION_PLAN)?;
            plan.set(
                attr::EXECUTION_PLAN_HANDLE,
                ty::HANDLE,
                &[handle],
                "plan handle",
            )?;
            plan.set_descriptors(attr::EXECUTION_PLAN_ENGINE_CONFIG, &[config], "plan cfg")?;
            match plan.finalize("execution plan") {
                Ok(()) => {
                    let mut workspace = 0i64;
                    let mut n = 0i64;
                    // SAFETY: one int64 out-value.
                    let status = unsafe {
                        (cudnn.api.get_attribute)(
                            plan.raw,
                            attr::EXECUTION_PLAN_WORKSPACE_SIZE,
                            ty::INT64,
                            1,
                            &mut n,
                            &mut workspace as *mut i64 as *mut c_void,
                        )
                    };
                    cudnn.api.check(status, "workspace size")?;
                    return Ok(Plan {
                        plan,
                        workspace: workspace as usize,
                        _keep: (graph, heur, configs, self.tensors, self.ops, self.settings),
                    });
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        bail!(
            "cuDNN found no engine for the graph ({count} candidates): {}",
            errors.join("; ")
        )
    }
}

/// A finalized execution plan, with everything it was built from kept alive.
pub(crate) struct Plan {
    plan: Descriptor,
    pub workspace: usize,
    #[allow(clippy::type_complexity)]
    _keep: (
        Descriptor,
        Descriptor,
        Vec<Descriptor>,
        Vec<Descriptor>,
        Vec<Descriptor>,
        Vec<Descriptor>,
    ),
}

impl Plan {
    /// Runs the plan on `handle`'s stream: `pointers[i]` is the device address (or, for a
    /// by-value scalar, the host address) of the tensor named `uids[i]`.
    pub fn execute(
        &self,
        handle: *mut c_void,
        uids: &[i64],
        pointers: &[*mut c_void],
        workspace: *mut c_void,
    ) -> Result<()> {
        let cudnn = self.plan.cudnn;
        let pack = cudnn.descriptor(kind::VARIANT_PACK)?;
        pack.set(attr::VARIANT_PACK_UNIQUE_IDS, ty::INT64, uids, "pack ids")?;
        pack.set(
            attr::VARIANT_PACK_DATA_POINTERS,
            ty::VOID_PTR,
            pointers,
            "pack ptrs",
        )?;
        pack.set(
            attr::VARIANT_PACK_WORKSPACE,
            ty::VOID_PTR,
            &[workspace],
            "workspace",
        )?;
        pack.finalize("variant pack")?;
        // SAFETY: the plan and pack are finalized; the pointers are live for the call's work,
        // which runs on the handle's stream, in order with kiln's other work.
        let status = unsafe { (cudnn.api.execute)(handle, self.plan.raw, pack.raw) };
        cudnn.api.check(status, "execute")
    }
}

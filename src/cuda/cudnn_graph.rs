//! Operation graphs for cuDNN's runtime fusion engine: tensors (real ones named by the unique
//! ids the variant pack binds at execution, virtual ones that live inside the fused kernel),
//! pointwise, matmul, reduction and reshape operations, and the execution plan of the first
//! engine configuration cuDNN's heuristics rank that accepts the graph.

use std::ffi::c_void;

use candle_core::{bail, Result};

use super::cudnn::{
    attr, kind, ty, Cudnn, DataType, Descriptor, Pointwise, RawDesc, Reduce, HEUR_MODE_A,
};

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
        // cuDNN fills the engine-config descriptors created for it.
        let mut raws: Vec<RawDesc> = configs.iter().map(|c| c.raw).collect();
        let count = heur.get(
            attr::ENGINEHEUR_RESULTS,
            ty::BACKEND_DESCRIPTOR,
            &mut raws,
            "heuristics results",
        )?;
        let mut errors = vec![];
        for config in configs.iter().take(count) {
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
                    let mut workspace = [0i64];
                    plan.get(
                        attr::EXECUTION_PLAN_WORKSPACE_SIZE,
                        ty::INT64,
                        &mut workspace,
                        "workspace size",
                    )?;
                    let workspace = workspace[0];
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
        self.plan.execute(handle, &pack)
    }
}

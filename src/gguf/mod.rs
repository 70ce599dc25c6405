//! GGUF v3, the file format of llama.cpp and Ollama (docs/formats.md C): typed
//! metadata, tensor infos, aligned tensor data. [`write`] streams one tensor at a time to a
//! temporary file renamed at the end; [`GgufFile::open`] validates everything llama.cpp checks
//! before any tensor is read, so a truncated or corrupt file is an error, never a panic.

pub mod calibrated;
pub mod keys;
pub mod quants;

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{KilnError, Result};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Is `path` a GGUF file (by its magic bytes)?
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == MAGIC
}

/// llama.cpp's GGML_MAX_NAME, NUL included.
const MAX_NAME_BYTES: usize = 63;
const MAX_DIMS: usize = 4;

/// Tensor storage types (ggml_type ids) kiln writes or reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16,
        ]
        .into_iter()
        .find(|t| t.id() == id)
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Bytes of `n` elements (`n` a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }
}

/// Metadata value types (GGUF's `gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .into_iter()
        .find(|t| *t as u32 == id)
    }

    /// Smallest encoded size of one value, to bound array counts by the bytes left.
    fn min_bytes(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::String | ValueType::U64 | ValueType::I64 | ValueType::F64 => 8,
            ValueType::Array => 12,
        }
    }
}

/// One metadata value, typed exactly as it is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    pub fn strings(items: impl IntoIterator<Item = String>) -> Value {
        Value::Array(
            ValueType::String,
            items.into_iter().map(Value::String).collect(),
        )
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer value as u64 (negative ones excepted).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays abbreviated), for `kiln inspect`.
    pub fn display_short(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 80 => {
                let head: String = s.chars().take(77).collect();
                format!("{head:?}… ({} chars)", s.chars().count())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(t, items) => {
                let shown: Vec<String> = items.iter().take(5).map(|v| v.display_short()).collect();
                let more = if items.len() > 5 { ", …" } else { "" };
                format!("[{}{more}] ({} × {:?})", shown.join(", "), items.len(), t)
            }
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

/// A tensor's entry in the header: name, dims in GGUF order (`ne[0]` fastest), storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl TensorInfo {
    /// From a PyTorch-order shape (`[out, in]`), which GGUF stores reversed.
    pub fn from_torch_shape(name: impl Into<String>, shape: &[usize], ggml_type: GgmlType) -> Self {
        TensorInfo {
            name: name.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type,
        }
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.ggml_type.bytes_for(self.elements() as usize)
    }

    /// The shape in PyTorch order (`[out, in]`).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

fn pad(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

struct Encoder<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> Encoder<W> {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }
    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }
    fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }
    fn value(&mut self, v: &Value) -> std::io::Result<()> {
        match v {
            Value::U8(x) => self.bytes(&[*x]),
            Value::I8(x) => self.bytes(&x.to_le_bytes()),
            Value::U16(x) => self.bytes(&x.to_le_bytes()),
            Value::I16(x) => self.bytes(&x.to_le_bytes()),
            Value::U32(x) => self.u32(*x),
            Value::I32(x) => self.bytes(&x.to_le_bytes()),
            Value::F32(x) => self.bytes(&x.to_le_bytes()),
            Value::Bool(x) => self.bytes(&[*x as u8]),
            Value::String(s) => self.string(s),
            Value::Array(t, items) => {
                self.u32(*t as u32)?;
                self.u64(items.len() as u64)?;
                items.iter().try_for_each(|item| self.value(item))
            }
            Value::U64(x) => self.u64(*x),
            Value::I64(x) => self.bytes(&x.to_le_bytes()),
            Value::F64(x) => self.bytes(&x.to_le_bytes()),
        }
    }
    fn zeros(&mut self, n: u64) -> std::io::Result<()> {
        self.bytes(&vec![0u8; n as usize])
    }
}

/// Checks what llama.cpp would refuse: names, duplicates, dims, block divisibility, array types.
fn validate_for_write(metadata: &[(String, Value)], tensors: &[TensorInfo]) -> Result<()> {
    let bad = |m: String| Err(KilnError::Usage(format!("GGUF writer: {m}")));
    let mut keys = HashSet::new();
    for (k, v) in metadata {
        if !keys.insert(k.as_str()) {
            return bad(format!("duplicate metadata key `{k}`"));
        }
        if let Value::Array(t, items) = v {
            if items.iter().any(|i| i.value_type() != *t) {
                return bad(format!("array `{k}` mixes element types"));
            }
        }
    }
    let mut names = HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return bad(format!("duplicate tensor `{}`", t.name));
        }
        if t.name.len() > MAX_NAME_BYTES {
            return bad(format!("tensor name `{}` is over 63 bytes", t.name));
        }
        if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
            return bad(format!("tensor `{}` has {} dims", t.name, t.dims.len()));
        }
        if t.dims[0] % t.ggml_type.block_size() as u64 != 0 {
            return bad(format!(
                "tensor `{}`: row length {} is not a multiple of {}'s block of {}",
                t.name,
                t.dims[0],
                t.ggml_type.name(),
                t.ggml_type.block_size()
            ));
        }
    }
    Ok(())
}

/// Writes a GGUF file: `metadata` in order, then `tensors` whose bytes `data(i)` produces one at
/// a time (so only one tensor is in memory), `on_tensor` called after each. The file appears at
/// `path` only when complete.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    validate_for_write(metadata, tensors)?;
    let align = metadata
        .iter()
        .find(|(k, _)| k == keys::general::ALIGNMENT)
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| KilnError::io(parent, e))?;
    }
    let tmp = crate::io::temp_path(path);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| KilnError::io(&tmp, e))?;
        let mut enc = Encoder {
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
        };
        let io = |e| KilnError::io(path, e);
        enc.bytes(MAGIC).map_err(io)?;
        enc.u32(VERSION).map_err(io)?;
        enc.u64(tensors.len() as u64).map_err(io)?;
        enc.u64(metadata.len() as u64).map_err(io)?;
        for (k, v) in metadata {
            enc.string(k).map_err(io)?;
            enc.u32(v.value_type() as u32).map_err(io)?;
            enc.value(v).map_err(io)?;
        }
        let mut offset = 0u64;
        for t in tensors {
            enc.string(&t.name).map_err(io)?;
            enc.u32(t.dims.len() as u32).map_err(io)?;
            for &d in &t.dims {
                enc.u64(d).map_err(io)?;
            }
            enc.u32(t.ggml_type.id()).map_err(io)?;
            enc.u64(offset).map_err(io)?;
            offset += pad(t.nbytes() as u64, align);
        }
        let header_end = enc.written;
        enc.zeros(pad(header_end, align) - header_end).map_err(io)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() != t.nbytes() {
                return Err(KilnError::Quant(format!(
                    "tensor `{}`: {} bytes produced, {} expected for {} {:?}",
                    t.name,
                    bytes.len(),
                    t.nbytes(),
                    t.ggml_type.name(),
                    t.dims
                )));
            }
            enc.bytes(&bytes).map_err(io)?;
            let n = bytes.len() as u64;
            enc.zeros(pad(n, align) - n).map_err(io)?;
        }
        let file = enc.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A tensor as the file describes it.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub info: TensorInfo,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// An opened, validated GGUF file: metadata and tensor table read; tensor data read on demand.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

struct Decoder<R: Read> {
    input: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Decoder<R> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(format!(
                "truncated: {what} at byte {} needs {n} bytes, the file has {} left",
                self.pos,
                self.len.saturating_sub(self.pos)
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.input
            .read_exact(&mut buf)
            .map_err(|e| format!("read failed at byte {}: {e}", self.pos))?;
        self.pos += n;
        Ok(buf)
    }
    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes).map_err(|_| format!("{what} is not valid UTF-8"))
    }
    fn value(&mut self, t: ValueType, key: &str, depth: u32) -> std::result::Result<Value, String> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("`{key}`: bool byte {b} is neither 0 nor 1")),
            },
            ValueType::String => Value::String(self.string(key)?),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                if depth > 0 {
                    return Err(format!("`{key}`: nested arrays are not supported"));
                }
                let id = self.u32(key)?;
                let elem = ValueType::from_id(id)
                    .ok_or_else(|| format!("`{key}`: unknown array element type {id}"))?;
                let n = self.u64(key)?;
                if n.saturating_mul(elem.min_bytes()) > self.len.saturating_sub(self.pos) {
                    return Err(format!(
                        "`{key}`: array of {n} elements does not fit in the file (truncated or corrupt)"
                    ));
                }
                let items = (0..n)
                    .map(|_| self.value(elem, key, depth + 1))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Value::Array(elem, items)
            }
        })
    }
}

impl GgufFile {
    /// Reads and validates the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| KilnError::io(path, e))?;
        let len = file.metadata().map_err(|e| KilnError::io(path, e))?.len();
        let mut dec = Decoder {
            input: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            len,
        };
        Self::parse(path, &mut dec).map_err(|m| KilnError::model(path, m))
    }

    /// Reads and validates a GGUF header held in memory (`path` only names it in errors).
    pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut dec = Decoder {
            input: bytes,
            pos: 0,
            len: bytes.len() as u64,
        };
        Self::parse(path, &mut dec).map_err(|m| KilnError::model(path, m))
    }

    fn parse<R: Read>(path: &Path, dec: &mut Decoder<R>) -> std::result::Result<Self, String> {
        let magic = dec
            .array::<4>("magic")
            .map_err(|_| "not a GGUF file: shorter than the 4-byte magic".to_string())?;
        if &magic != MAGIC {
            return Err(format!(
                "not a GGUF file: magic bytes {magic:02x?}, expected \"GGUF\""
            ));
        }
        let version = dec.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (kiln reads versions 2 and 3)"
            ));
        }
        let n_tensors = dec.u64("tensor count")?;
        let n_kv = dec.u64("metadata count")?;
        // Each entry takes at least 12 (kv) or 24 (tensor) bytes: bound the counts by the file.
        let left = dec.len.saturating_sub(dec.pos);
        if n_kv.saturating_mul(12) > left || n_tensors.saturating_mul(24) > left {
            return Err(format!(
                "header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold (truncated or corrupt)"
            ));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = dec.string(&format!("metadata key {i}"))?;
            let id = dec.u32(&key)?;
            let t = ValueType::from_id(id)
                .ok_or_else(|| format!("metadata `{key}` has unknown type {id}"))?;
            let v = dec.value(t, &key, 0)?;
            if !keys.insert(key.clone()) {
                return Err(format!("duplicate metadata key `{key}`"));
            }
            metadata.push((key, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == keys::general::ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
            Some((_, v)) => {
                return Err(format!(
                    "general.alignment must be a u32 power of two, found {v:?}"
                ))
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        let mut expected_offset = 0u64;
        for i in 0..n_tensors {
            let name = dec.string(&format!("tensor {i} name"))?;
            if name.len() > MAX_NAME_BYTES {
                return Err(format!("tensor name `{name}` is over 63 bytes"));
            }
            let n_dims = dec.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor `{name}` has {n_dims} dims (1 to 4 allowed)"
                ));
            }
            let dims = (0..n_dims)
                .map(|_| dec.u64(&name))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let type_id = dec.u32(&name)?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                format!("tensor `{name}` has ggml type {type_id}, which kiln does not read")
            })?;
            let offset = dec.u64(&name)?;
            if dims.contains(&0)
                || dims
                    .iter()
                    .try_fold(1u64, |a, &d| a.checked_mul(d))
                    .is_none()
            {
                return Err(format!("tensor `{name}` has invalid dims {dims:?}"));
            }
            if dims[0] % ggml_type.block_size() as u64 != 0 {
                return Err(format!(
                    "tensor `{name}`: row length {} is not a multiple of {}'s block of {}",
                    dims[0],
                    ggml_type.name(),
                    ggml_type.block_size()
                ));
            }
            if offset != expected_offset {
                return Err(format!(
                    "tensor `{name}` has offset {offset}, expected {expected_offset} (bad tensor offsets)"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("duplicate tensor `{name}`"));
            }
            let info = TensorInfo {
                name,
                dims,
                ggml_type,
            };
            expected_offset = offset + pad(info.nbytes() as u64, alignment);
            tensors.push(TensorEntry { info, offset });
        }
        let data_start = pad(dec.pos, alignment);
        let needed = tensors
            .last()
            .map(|t| data_start + t.offset + t.info.nbytes() as u64)
            .unwrap_or(data_start.min(dec.len));
        if needed > dec.len {
            return Err(format!(
                "truncated: the tensors need {needed} bytes, the file has {}",
                dec.len
            ));
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A required metadata value, or an error naming the key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| KilnError::model(&self.path, format!("metadata key `{key}` is missing")))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?.as_u64().ok_or_else(|| {
            KilnError::model(&self.path, format!("metadata `{key}` is not an integer"))
        })
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.require(key)?.as_str().ok_or_else(|| {
            KilnError::model(&self.path, format!("metadata `{key}` is not a string"))
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.info.name == name)
    }

    /// The stored bytes of `entry`.
    pub fn tensor_bytes(&self, entry: &TensorEntry) -> Result<Vec<u8>> {
        let mut f = std::fs::File::open(&self.path).map_err(|e| KilnError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(self.data_start + entry.offset))
            .map_err(|e| KilnError::io(&self.path, e))?;
        let mut buf = vec![0u8; entry.info.nbytes()];
        f.read_exact(&mut buf)
            .map_err(|e| KilnError::io(&self.path, e))?;
        Ok(buf)
    }

    /// The values of `entry` as f32, in PyTorch (row-major `[out, in]`) order.
    pub fn tensor_f32(&self, entry: &TensorEntry) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(entry)?;
        quants::dequantize(entry.info.ggml_type, &bytes)
    }
}

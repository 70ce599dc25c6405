//! TensorBoard event files, written by hand: the format is small. A file is a sequence of
//! TFRecords (a little-endian u64 length, its masked CRC-32C, the bytes, their masked CRC-32C),
//! each an `Event` protobuf (tensorflow/core/util/event.proto): the first names the file version,
//! the rest carry a `Summary` of scalars (`simple_value`) or of text (a string tensor under the
//! `text` plugin). TensorBoard reads every `*tfevents*` file of a folder.
//!
//! A run's folder holds one file, rewritten from `metrics.jsonl` when a run resumes, so a resumed
//! run's curves continue without the steps it threw away.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{KilnError, Result};

/// The name TensorBoard's loader looks for, and the version of the records.
const FILE_VERSION: &str = "brain.Event:2";
/// `DT_STRING` of tensorflow/core/framework/types.proto.
const DT_STRING: u64 = 7;

/// Protobuf fields, as the .proto files number them.
mod field {
    pub const EVENT_WALL_TIME: u32 = 1;
    pub const EVENT_STEP: u32 = 2;
    pub const EVENT_FILE_VERSION: u32 = 3;
    pub const EVENT_SUMMARY: u32 = 5;
    pub const SUMMARY_VALUE: u32 = 1;
    pub const VALUE_TAG: u32 = 1;
    pub const VALUE_SIMPLE: u32 = 2;
    pub const VALUE_TENSOR: u32 = 8;
    pub const VALUE_METADATA: u32 = 9;
    pub const METADATA_PLUGIN: u32 = 1;
    pub const PLUGIN_NAME: u32 = 1;
    pub const TENSOR_DTYPE: u32 = 1;
    pub const TENSOR_SHAPE: u32 = 2;
    pub const TENSOR_STRING_VAL: u32 = 8;
}

/// The protobuf wire encoding of the few field kinds events use.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn double(mut self, field: u32, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn int(mut self, field: u32, v: u64) -> Self {
        self.key(field, 0);
        self.varint(v);
        self
    }
    fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    fn message(self, field: u32, m: Proto) -> Self {
        self.bytes(field, &m.0)
    }
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn event(wall_time: f64, step: u64) -> Proto {
    Proto::default()
        .double(field::EVENT_WALL_TIME, wall_time)
        .int(field::EVENT_STEP, step)
}

/// The scalar and text values of one event.
fn summary_event(wall_time: f64, step: u64, values: Vec<Proto>) -> Vec<u8> {
    let summary = values
        .into_iter()
        .fold(Proto::default(), |s, v| s.message(field::SUMMARY_VALUE, v));
    record(
        &event(wall_time, step)
            .message(field::EVENT_SUMMARY, summary)
            .0,
    )
}

fn scalar_value(tag: &str, v: f32) -> Proto {
    Proto::default()
        .bytes(field::VALUE_TAG, tag.as_bytes())
        .float(field::VALUE_SIMPLE, v)
}

fn text_value(tag: &str, text: &str) -> Proto {
    let plugin = Proto::default().bytes(field::PLUGIN_NAME, b"text");
    let metadata = Proto::default().message(field::METADATA_PLUGIN, plugin);
    let tensor = Proto::default()
        .int(field::TENSOR_DTYPE, DT_STRING)
        .message(field::TENSOR_SHAPE, Proto::default())
        .bytes(field::TENSOR_STRING_VAL, text.as_bytes());
    Proto::default()
        .bytes(field::VALUE_TAG, tag.as_bytes())
        .message(field::VALUE_METADATA, metadata)
        .message(field::VALUE_TENSOR, tensor)
}

/// The scalars of a `metrics.jsonl` line: every number but the step, tagged by its key.
fn scalars_of(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(map) = line.as_object() else {
        return vec![];
    };
    map.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x as f32)))
        .collect()
}

/// Seconds since the Unix epoch, now.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A run's event file, appended as the run logs.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Starts `dir`'s event file afresh (any earlier one is removed: a resumed run rewrites its
    /// history from `metrics.jsonl`), stamped `wall_time`.
    pub fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir, e))?;
        for old in event_files(dir) {
            let _ = std::fs::remove_file(old);
        }
        let path = dir.join(format!("events.out.tfevents.{}.kiln", wall_time as u64));
        let file = std::fs::File::create(&path).map_err(|e| KilnError::io(&path, e))?;
        let mut w = Self { path, file };
        let first = event(wall_time, 0).bytes(field::EVENT_FILE_VERSION, FILE_VERSION.as_bytes());
        w.write(&record(&first.0))?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .and_then(|_| self.file.flush())
            .map_err(|e| KilnError::io(&self.path, e))
    }

    /// One `metrics.jsonl` line's numbers as scalars at its step.
    pub fn metrics(&mut self, line: &serde_json::Value, wall_time: f64) -> Result<()> {
        let step = line["step"].as_u64().unwrap_or(0);
        let values: Vec<Proto> = scalars_of(line)
            .iter()
            .map(|(tag, v)| scalar_value(tag, *v))
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.write(&summary_event(wall_time, step, values))
    }

    /// A text (the recipe, a sample generation) at `step`; shown as markdown by TensorBoard.
    pub fn text(&mut self, step: u64, tag: &str, text: &str, wall_time: f64) -> Result<()> {
        self.write(&summary_event(wall_time, step, vec![text_value(tag, text)]))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The event files of `dir`, by name.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("tfevents"))
        })
        .collect();
    files.sort();
    files
}

/// What an event file holds, read back (checking every record's CRCs): `(step, tag, value)` of
/// each scalar, and `(step, tag, text)` of each text.
#[derive(Debug, Default, PartialEq)]
pub struct Events {
    pub file_version: String,
    pub scalars: Vec<(u64, String, f32)>,
    pub texts: Vec<(u64, String, String)>,
}

/// Reads an event file written by any TensorBoard writer (the fields kiln writes; others are
/// skipped).
pub fn read(path: &Path) -> Result<Events> {
    let bytes = std::fs::read(path).map_err(|e| KilnError::io(path, e))?;
    let bad =
        |what: &str| KilnError::data(path, None, format!("not a TensorBoard event file: {what}"));
    let mut out = Events::default();
    let mut at = 0;
    while at < bytes.len() {
        let take = |at: usize, n: usize| {
            bytes
                .get(at..at + n)
                .ok_or_else(|| bad("a record is cut short"))
        };
        let len_bytes = take(at, 8)?;
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(take(at + 8, 4)?.try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return Err(bad("a length's CRC is wrong"));
        }
        let data = take(at + 12, len)?;
        let crc = u32::from_le_bytes(take(at + 12 + len, 4)?.try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err(bad("a record's CRC is wrong"));
        }
        decode_event(data, &mut out).ok_or_else(|| bad("an event does not parse"))?;
        at += 16 + len;
    }
    Ok(out)
}

/// The fields of one protobuf message: `(field, wire value)`.
enum Wire<'a> {
    Int(u64),
    /// A double (the wall time), skipped.
    Fixed64,
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> Option<Vec<(u32, Wire<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = vec![];
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Wire::Int(varint(&mut b)?),
            1 => {
                b = b.get(8..)?;
                Wire::Fixed64
            }
            2 => {
                let n = varint(&mut b)? as usize;
                let (v, rest) = b.split_at_checked(n)?;
                b = rest;
                Wire::Bytes(v)
            }
            5 => {
                let (v, rest) = b.split_at_checked(4)?;
                b = rest;
                Wire::Fixed32(u32::from_le_bytes(v.try_into().ok()?))
            }
            _ => return None,
        };
        out.push((field, value));
    }
    Some(out)
}

fn decode_event(data: &[u8], out: &mut Events) -> Option<()> {
    let mut step = 0;
    let mut summary = None;
    for (f, v) in fields(data)? {
        match (f, v) {
            (field::EVENT_STEP, Wire::Int(s)) => step = s,
            (field::EVENT_FILE_VERSION, Wire::Bytes(b)) => {
                out.file_version = String::from_utf8_lossy(b).into_owned()
            }
            (field::EVENT_SUMMARY, Wire::Bytes(b)) => summary = Some(b),
            _ => {}
        }
    }
    for (f, v) in fields(summary.unwrap_or_default())? {
        let (field::SUMMARY_VALUE, Wire::Bytes(value)) = (f, v) else {
            continue;
        };
        let (mut tag, mut simple, mut text) = (String::new(), None, None);
        for (f, v) in fields(value)? {
            match (f, v) {
                (field::VALUE_TAG, Wire::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
                (field::VALUE_SIMPLE, Wire::Fixed32(x)) => simple = Some(f32::from_bits(x)),
                (field::VALUE_TENSOR, Wire::Bytes(t)) => {
                    for (f, v) in fields(t)? {
                        if let (field::TENSOR_STRING_VAL, Wire::Bytes(s)) = (f, v) {
                            text = Some(String::from_utf8_lossy(s).into_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(x) = simple {
            out.scalars.push((step, tag, x));
        } else if let Some(t) = text {
            out.texts.push((step, tag, t));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TFRecord's own example: the masked CRC-32C of b"" and a known CRC-32C value.
    #[test]
    fn crc32c_and_its_mask_are_tfrecords() {
        // CRC-32C("123456789") = 0xE3069283 (the catalogue's check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 1000.0).unwrap();
        let line =
            serde_json::json!({"step": 3, "loss": 1.5, "lr": 2e-4, "rewards/margins": -0.25});
        w.metrics(&line, 1001.0).unwrap();
        w.text(3, "samples", "héllo\nworld", 1002.0).unwrap();
        let e = read(w.path()).unwrap();
        assert_eq!(e.file_version, FILE_VERSION);
        assert_eq!(
            e.scalars,
            vec![
                (3, "loss".into(), 1.5),
                (3, "lr".into(), 2e-4),
                (3, "rewards/margins".into(), -0.25)
            ]
        );
        assert_eq!(e.texts, vec![(3, "samples".into(), "héllo\nworld".into())]);
        // A flipped byte is caught by the CRC.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read(w.path()).is_err());
    }
}

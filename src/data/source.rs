//! Dataset files to rows: JSON Lines, JSON arrays and Parquet, each row a JSON value with the
//! place it came from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use crate::error::{KilnError, Result};

/// Where a row sits: a line of a JSONL file, or the n-th record of a JSON array / Parquet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlace {
    pub file: Arc<PathBuf>,
    pub line: Option<usize>,
    pub row: usize,
}

impl RowPlace {
    /// An error about this row.
    pub fn error(&self, message: impl Into<String>) -> KilnError {
        match self.line {
            Some(line) => KilnError::data(&*self.file, Some(line), message),
            None => KilnError::data(
                &*self.file,
                None,
                format!("row {}: {}", self.row, message.into()),
            ),
        }
    }

    /// A row that cannot be used: counted in `skipped` with `data.skip_bad_rows` (`skip`), else
    /// the error naming it and the setting.
    pub fn skip_or_fail(&self, message: &str, skip: bool, skipped: &mut usize) -> Result<()> {
        if skip {
            *skipped += 1;
            return Ok(());
        }
        Err(self.error(format!(
            "{message} (set data.skip_bad_rows = true to skip such rows)"
        )))
    }

    pub fn describe(&self) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", self.file.display()),
            None => format!("{} row {}", self.file.display(), self.row),
        }
    }
}

/// A row, or why it could not be read (a bad JSON line; skippable with `skip_bad_rows`).
pub type RawRow = (RowPlace, std::result::Result<Json, String>);

const EXTENSIONS: &[&str] = &["jsonl", "ndjson", "json", "parquet"];

/// The files of `split` in directory `dir`: `train.jsonl`, `train-00000-of-00002.parquet`,
/// also under `dir/data/` (the Hugging Face Hub layout).
fn split_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let mut found = vec![];
    let mut seen = vec![];
    for d in [dir.to_path_buf(), dir.join("data")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let ext_ok = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e));
            if !ext_ok || !path.is_file() {
                continue;
            }
            seen.push(name.clone());
            let stem = name.split('.').next().unwrap_or("");
            if stem == split || stem.starts_with(&format!("{split}-")) {
                found.push(path);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        seen.sort();
        return Err(KilnError::data(
            dir,
            None,
            if seen.is_empty() {
                "no dataset files (.jsonl, .json, .parquet) in this directory".to_string()
            } else {
                format!(
                    "no files of split `{split}` here (found {}); set data.split or name the files in data.path",
                    seen.join(", ")
                )
            },
        ));
    }
    Ok(found)
}

/// The data files named by `paths` (files or directories holding `split`).
pub fn resolve_files(paths: &[String], split: &str) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for p in paths {
        let path = PathBuf::from(p);
        if path.is_dir() {
            files.extend(split_files(&path, split)?);
        } else if !path.exists() {
            return Err(KilnError::data(&path, None, "dataset file not found"));
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Reads every row of one file.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let file = Arc::new(path.to_path_buf());
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => read_parquet(&file),
        "jsonl" | "ndjson" | "json" => {
            let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    KilnError::data(path, None, "dataset file not found")
                }
                std::io::ErrorKind::InvalidData => {
                    KilnError::data(path, None, "not UTF-8 text; JSON datasets must be UTF-8")
                }
                _ => KilnError::io(path, e),
            })?;
            if text.trim_start().starts_with('[') {
                read_json_array(&file, &text)
            } else {
                Ok(read_jsonl(&file, &text))
            }
        }
        _ => Err(KilnError::data(
            path,
            None,
            "unknown dataset file type; use .jsonl (one JSON object per line), .json (an array of objects) or .parquet",
        )),
    }
}

fn read_jsonl(file: &Arc<PathBuf>, text: &str) -> Vec<RawRow> {
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let place = RowPlace {
            file: file.clone(),
            line: Some(i + 1),
            row: rows.len() + 1,
        };
        let value = serde_json::from_str::<Json>(line)
            .map_err(|e| format!("not valid JSON ({e}); each line must be one JSON object"));
        rows.push((place, value));
    }
    rows
}

fn read_json_array(file: &Arc<PathBuf>, text: &str) -> Result<Vec<RawRow>> {
    let values: Vec<Json> = serde_json::from_str(text).map_err(|e| {
        KilnError::data(
            &**file,
            Some(e.line()),
            format!("not a valid JSON array of rows ({e})"),
        )
    })?;
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            (
                RowPlace {
                    file: file.clone(),
                    line: None,
                    row: i + 1,
                },
                Ok(v),
            )
        })
        .collect())
}

fn read_parquet(file: &Arc<PathBuf>) -> Result<Vec<RawRow>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(&**file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KilnError::data(&**file, None, "dataset file not found"),
        _ => KilnError::io(&**file, e),
    })?;
    let reader = SerializedFileReader::new(f)
        .map_err(|e| KilnError::data(&**file, None, format!("not a readable Parquet file: {e}")))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| KilnError::data(&**file, None, format!("cannot read Parquet rows: {e}")))?;
    let mut rows = vec![];
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| {
            KilnError::data(&**file, None, format!("row {}: cannot decode: {e}", i + 1))
        })?;
        rows.push((
            RowPlace {
                file: file.clone(),
                line: None,
                row: i + 1,
            },
            Ok(row.to_json_value()),
        ));
    }
    Ok(rows)
}

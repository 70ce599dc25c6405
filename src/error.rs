//! Typed errors of the library. Only `main.rs` turns them into messages and exit codes.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KilnError {
    /// The recipe file or a `--set` override is wrong; the message names the key and the fix.
    #[error("{0}")]
    Recipe(String),
    /// A dataset file or row is wrong.
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        file: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A model directory or checkpoint is missing, incomplete or of an unsupported kind.
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    /// Reading or writing a file failed.
    #[error("{}: {source}{}", path.display(), io_hint(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad arguments on the command line.
    #[error("{0}")]
    Usage(String),
    #[error("quantization: {0}")]
    Quant(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Training stopped for a numerical or internal reason.
    #[error("training: {0}")]
    Train(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KilnError>;

/// What to do about an I/O error the user can fix.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            " (the disk is full: free space or choose another output.dir; finished checkpoints are intact, resume from the last one)"
        }
        _ => "",
    }
}

impl KilnError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        KilnError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn model(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        KilnError::Model {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    pub fn data(file: impl AsRef<Path>, line: Option<usize>, message: impl Into<String>) -> Self {
        KilnError::Data {
            file: file.as_ref().to_path_buf(),
            line,
            message: message.into(),
        }
    }

    /// 2 for input the user can fix (recipe, data, model files, flags), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            KilnError::Recipe(_)
            | KilnError::Data { .. }
            | KilnError::Model { .. }
            | KilnError::Usage(_)
            | KilnError::Tokenizer(_) => 2,
            // Paths the user can fix: missing, not writable, a file where a directory should be.
            KilnError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::PermissionDenied
                        | std::io::ErrorKind::NotADirectory
                        | std::io::ErrorKind::ReadOnlyFilesystem
                        | std::io::ErrorKind::IsADirectory
                        | std::io::ErrorKind::StorageFull
                        | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                2
            }
            _ => 1,
        }
    }
}

//! kiln: QLoRA fine-tuning in Rust on candle.
//!
//! The pipeline, in order: [`recipe`] → [`data`] → [`model`] (with [`quant`] and [`lora`]) →
//! [`train`] → [`export`].

/// The one device seam: the CUDA kernels, or (built without CUDA) `off.rs`, the same names
/// that answer with an error. Callers check the device before they call, so `off.rs` is never
/// reached.
#[cfg_attr(not(feature = "cuda"), path = "cuda/off.rs")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod distributed;
pub mod error;
pub mod export;
pub mod gguf;
pub mod infer;
pub mod io;
pub mod layout;
pub mod lora;
pub mod model;
pub mod ops;
pub mod profile;
pub mod progress;
pub mod quant;
pub mod recipe;
pub mod report;
pub mod rng;
pub mod step;
pub mod tokenizer;
pub mod train;

pub use error::{KilnError, Result};

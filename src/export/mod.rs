//! Files other tools read: PEFT adapters (both ways), merged models GGUF files and adapters for llama.cpp, Ollama Modelfiles.

pub mod auto_types;
pub mod calibrate;
pub mod gguf;
pub mod gguf_types;
pub mod inspect;
pub mod merge;

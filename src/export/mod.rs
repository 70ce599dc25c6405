//! Files other tools read: PEFT adapters (both ways), merged models (later: GGUF, Modelfile).

pub mod inspect;
pub mod merge;
pub mod peft;

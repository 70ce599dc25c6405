//! Files other tools read: PEFT adapters (later: merged models, GGUF, Modelfile).

pub mod peft;

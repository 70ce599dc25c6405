//! NF4 quantization: the bitsandbytes-exact codec, the frozen 4-bit linear layer, and the
//! bitsandbytes checkpoint format.

pub mod nf4;
mod tables;

pub use nf4::{Absmax, Nf4Tensor};

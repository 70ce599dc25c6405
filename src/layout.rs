//! How rows lie in the tensors that kernels, ops, the data pipeline and the model pass to each
//! other: attention heads, and examples packed into one row. Nothing here computes.

use candle_core::Tensor;

/// Where attention's rows lie in q, k, v, the output and their gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[B, heads, T, D]`: candle's attention layout.
    HeadsMajor,
    /// `[B, T, heads, D]`: a projection's output `[B, T, heads·D]` viewed as heads (no copy);
    /// only the flash kernels take it.
    TokenMajor,
}

impl HeadLayout {
    /// `(batch, heads, rows, D)` of a tensor in this layout.
    pub fn dims(self, x: &Tensor) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, i, j, d) = x.dims4()?;
        Ok(match self {
            Self::HeadsMajor => (b, i, j, d),
            Self::TokenMajor => (b, j, i, d),
        })
    }

    /// The shape of `heads` heads of `rows` rows in this layout.
    pub fn shape(
        self,
        b: usize,
        heads: usize,
        rows: usize,
        d: usize,
    ) -> (usize, usize, usize, usize) {
        match self {
            Self::HeadsMajor => (b, heads, rows, d),
            Self::TokenMajor => (b, rows, heads, d),
        }
    }
}

/// Several examples packed into each row: each token's position within its example `[B, T]`
/// (u32) and the additive mask `[B, 1, T, T]` that lets a token see only earlier tokens of its
/// own example.
pub struct PackedLayout {
    pub positions: Tensor,
    pub mask: Tensor,
    /// The largest position + 1 (LongRoPE picks its factors by it).
    pub positions_end: usize,
}

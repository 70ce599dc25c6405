//! Examples to training sequences (one example each, or several packed), sequences to padded
//! micro-batches, and the seeded order they are drawn in.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::Example;
use crate::error::Result;
use crate::layout::PackedLayout;
use crate::rng::KilnRng;

/// Packs examples into sequences of at most `capacity` tokens, best fit decreasing: the longest
/// example first, each into the fullest sequence it still fits. Deterministic.
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = vec![];
    // Free space -> bins with that much space left (lowest index first).
    let mut by_space: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i];
        let fit = by_space.range(len..).next().map(|(&space, _)| space);
        let bin = match fit {
            Some(space) => {
                let list = by_space.get_mut(&space).expect("present");
                let bin = list.remove(0);
                if list.is_empty() {
                    by_space.remove(&space);
                }
                bins[bin].push(i);
                let left = space - len;
                (bin, left)
            }
            None => {
                bins.push(vec![i]);
                (bins.len() - 1, capacity.saturating_sub(len))
            }
        };
        let list = by_space.entry(bin.1).or_default();
        let at = list.partition_point(|&b| b < bin.0);
        list.insert(at, bin.0);
    }
    for b in &mut bins {
        b.sort_unstable();
    }
    bins.sort_by_key(|b| b[0]);
    bins
}

/// The training sequences: lists of example indices (one each without packing).
pub struct TrainData {
    pub examples: Vec<Example>,
    pub sequences: Vec<Vec<usize>>,
    pub packed: bool,
}

impl TrainData {
    pub fn new(examples: Vec<Example>, packing: bool, max_seq_len: usize) -> Self {
        let sequences = if packing {
            let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
            pack(&lengths, max_seq_len)
        } else {
            (0..examples.len()).map(|i| vec![i]).collect()
        };
        Self {
            examples,
            sequences,
            packed: packing,
        }
    }

    /// A hash of every sequence's token ids and loss mask, in order (FNV-1a): what a cache of
    /// per-token values was computed for.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for seq in &self.sequences {
            eat(u64::MAX);
            for &i in seq {
                let e = &self.examples[i];
                for (&t, &m) in e.input_ids.iter().zip(&e.loss_mask) {
                    eat(t as u64 * 2 + m as u64);
                }
            }
        }
        h
    }

    pub fn num_targets(&self, sequence: usize) -> usize {
        self.sequences[sequence]
            .iter()
            .map(|&i| self.examples[i].num_targets())
            .sum()
    }

    /// Positions a sequence runs (each of its examples' tokens but the last), as
    /// [`Batch::num_tokens`] counts them.
    pub fn num_tokens(&self, sequence: usize) -> usize {
        self.sequences[sequence]
            .iter()
            .map(|&i| self.examples[i].input_ids.len().saturating_sub(1))
            .sum()
    }

    /// The micro-batch of `sequences` (indices into `self.sequences`).
    pub fn batch(&self, sequences: &[usize], pad_id: u32, device: &Device) -> Result<Batch> {
        let rows: Vec<Vec<&Example>> = sequences
            .iter()
            .map(|&s| {
                self.sequences[s]
                    .iter()
                    .map(|&i| &self.examples[i])
                    .collect()
            })
            .collect();
        make_batch(&rows, self.packed, pad_id, device)
    }
}

/// A padded micro-batch: `inputs` and `targets` `[B, T]` (u32), `weights` `[B, T]` (f32; 1 where
/// the target carries loss); for packed rows, the positions and block-diagonal mask.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    pub layout: Option<PackedLayout>,
    pub num_targets: usize,
    /// Positions the model runs (each example's tokens but its last).
    pub num_tokens: usize,
}

/// Right-pads rows to the longest one. Each row is one or more examples back to back; in each,
/// the model predicts token t+1 from the example's tokens up to t. With `packed`, positions
/// restart per example and no token attends across examples.
pub fn make_batch(
    rows: &[Vec<&Example>],
    packed: bool,
    pad_id: u32,
    device: &Device,
) -> Result<Batch> {
    let row_len = |row: &Vec<&Example>| row.iter().map(|e| e.input_ids.len() - 1).sum::<usize>();
    let t = rows.iter().map(row_len).max().unwrap_or(1).max(1);
    let b = rows.len();
    let mut inputs = vec![pad_id; b * t];
    let mut targets = vec![0u32; b * t];
    let mut weights = vec![0f32; b * t];
    let mut positions = vec![0u32; b * t];
    // Segment of each position; padding gets its own segment.
    let mut segment = vec![u32::MAX; b * t];
    let mut num_targets = 0;
    let mut num_tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * t;
        for (s, ex) in row.iter().enumerate() {
            let n = ex.input_ids.len() - 1;
            num_tokens += n;
            for j in 0..n {
                inputs[at + j] = ex.input_ids[j];
                targets[at + j] = ex.input_ids[j + 1];
                positions[at + j] = j as u32;
                segment[at + j] = s as u32;
                if ex.loss_mask[j + 1] {
                    weights[at + j] = 1.0;
                    num_targets += 1;
                }
            }
            at += n;
        }
        let pad_start = at - r * t;
        for (k, p) in (pad_start..t).enumerate() {
            positions[r * t + p] = k as u32;
        }
    }
    let layout = if packed {
        // Token i may see token j when j <= i and both belong to the same example; built on the
        // device from the segment ids, so only `[B, T]` ids cross from the host.
        let segment = Tensor::from_vec(segment, (b, t), device)?;
        let same = segment.unsqueeze(2)?.broadcast_eq(&segment.unsqueeze(1)?)?;
        let allowed = same.broadcast_mul(&Tensor::tril2(t, DType::U8, device)?)?;
        let zero = Tensor::zeros((b, t, t), DType::F32, device)?;
        let blocked = Tensor::full(f32::NEG_INFINITY, (b, t, t), device)?;
        let positions_end = positions.iter().max().map_or(0, |&p| p as usize + 1);
        Some(PackedLayout {
            positions: Tensor::from_vec(positions, (b, t), device)?,
            positions_end,
            mask: allowed.where_cond(&zero, &blocked)?.unsqueeze(1)?,
        })
    } else {
        None
    };
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        weights: Tensor::from_vec(weights, (b, t), device)?,
        layout,
        num_targets,
        num_tokens,
    })
}

/// Where the data stream stands: epoch and position in that epoch's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    pub position: usize,
}

/// Micro-batches over the sequences, epoch after epoch, each epoch in an order drawn from the
/// seed (or in file order without shuffling).
pub struct BatchStream {
    order: Vec<usize>,
    n: usize,
    micro_batch_size: usize,
    seed: u64,
    shuffle: bool,
    pub cursor: Cursor,
}

impl BatchStream {
    pub fn new(n: usize, micro_batch_size: usize, seed: u64, shuffle: bool) -> Self {
        let mut s = Self {
            order: vec![],
            n,
            micro_batch_size,
            seed,
            shuffle,
            cursor: Cursor::default(),
        };
        s.order = s.epoch_order(0);
        s
    }

    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n).collect();
        if self.shuffle {
            KilnRng::fork(self.seed, 1000 + epoch as u64).shuffle(&mut order);
        }
        order
    }

    pub fn micro_batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.micro_batch_size)
    }

    /// Indices of the next micro-batch (the last one of an epoch may be smaller).
    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.cursor.position >= self.n {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = self.epoch_order(self.cursor.epoch);
        }
        let end = (self.cursor.position + self.micro_batch_size).min(self.n);
        let idx = self.order[self.cursor.position..end].to_vec();
        self.cursor.position = end;
        idx
    }

    /// Fractional epochs consumed.
    /// Continues from `cursor` (a resumed run): that epoch's order, at that position.
    pub fn restore(&mut self, cursor: Cursor) {
        self.order = self.epoch_order(cursor.epoch);
        self.cursor = cursor;
    }

    pub fn epoch_progress(&self) -> f64 {
        self.cursor.epoch as f64 + self.cursor.position as f64 / self.n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_fits_and_keeps_every_example_once() {
        let lengths = [10, 3, 7, 5, 5, 2, 9, 1, 8];
        let bins = pack(&lengths, 12);
        let mut all: Vec<usize> = bins.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 12, "{b:?}");
        }
        // 50 tokens in bins of 12: best fit decreasing needs 5.
        assert_eq!(bins.len(), 5, "{bins:?}");
    }
}

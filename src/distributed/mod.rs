//! Data-parallel training: one process per GPU, each holding the whole NF4 base. Every rank runs
//! its share of a step's micro-batches; the LoRA gradients (and the loss) are then summed over
//! the ranks in one flat all-reduce, so clipping and AdamW run identically everywhere.
//!
//! - [`World`]: who this process is, from the launcher's environment (torchrun, srun, mpirun, or
//!   `kiln train --gpus N`, see [`launch`]).
//! - [`Collective`]: the sum and the broadcast. NCCL on CUDA (`nccl.rs`), TCP between
//!   CPU processes ([`rendezvous::TcpCollective`], what CI tests with), or nothing ([`Alone`]).
//! - [`rendezvous`]: the NCCL id handed out over TCP, and the watchdog that ends every rank when
//!   one dies.

pub mod launch;
pub mod nccl;
pub mod rendezvous;

use candle_core::{DType, Tensor};

use crate::error::{KilnError, Result};

/// This process's place in a distributed run.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank among this host's processes: its GPU.
    pub local_rank: usize,
    /// Rank 0's host (the rendezvous listens there).
    pub master_addr: String,
    /// The launcher's port; kiln's rendezvous uses [`World::rendezvous_port`].
    pub master_port: u16,
}

/// Environment keys read for rank, size and local rank: torchrun's first, then Slurm's, then
/// Open MPI's.
const RANK_KEYS: [(&str, &str, &str); 3] = [
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
];

/// torchrun's default `MASTER_PORT`.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl World {
    /// The distributed run this process belongs to, from the environment; `None` when there is
    /// none (no launcher's variables, or a world of one).
    pub fn from_env() -> Result<Option<World>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`World::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>> {
        let Some((rank_key, size_key, local_key)) = RANK_KEYS
            .iter()
            .find(|(r, s, _)| var(r).is_some() && var(s).is_some())
        else {
            return Ok(None);
        };
        let number = |key: &str| -> Result<usize> {
            let v = var(key).unwrap_or_default();
            v.trim().parse().map_err(|_| {
                KilnError::Usage(format!(
                    "environment variable {key}={v:?} is not a number (set by the launcher)"
                ))
            })
        };
        let (rank, size) = (number(rank_key)?, number(size_key)?);
        if size <= 1 {
            return Ok(None);
        }
        if rank >= size {
            return Err(KilnError::Usage(format!(
                "{rank_key}={rank} is not below {size_key}={size}"
            )));
        }
        let local_rank = if var(local_key).is_some() {
            number(local_key)?
        } else {
            rank
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| KilnError::Usage(format!("MASTER_PORT={p:?} is not a port number")))?,
            None => DEFAULT_MASTER_PORT,
        };
        if var("MASTER_ADDR").is_none() && var("LOCAL_WORLD_SIZE").is_none() && size > 1 {
            // One host is the only case where 127.0.0.1 is right; srun/mpirun across hosts
            // need MASTER_ADDR (README, "Several GPUs").
            if let Some(local_size) = ["SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"]
                .iter()
                .find_map(|k| var(k).and_then(|v| v.parse::<usize>().ok()))
            {
                if local_size < size {
                    return Err(KilnError::Usage(format!(
                        "{size} ranks span several hosts, but MASTER_ADDR is not set; export MASTER_ADDR=<rank 0's host> (README, \"Several GPUs\")"
                    )));
                }
            }
        }
        Ok(Some(World {
            rank,
            size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// kiln's rendezvous port: `KILN_RENDEZVOUS_PORT`, else `MASTER_PORT + 1` (torchrun's own
    /// store already listens on `MASTER_PORT`).
    pub fn rendezvous_port(&self) -> Result<u16> {
        match std::env::var("KILN_RENDEZVOUS_PORT") {
            Ok(p) => p.trim().parse().map_err(|_| {
                KilnError::Usage(format!("KILN_RENDEZVOUS_PORT={p:?} is not a port number"))
            }),
            Err(_) => Ok(self.master_port.wrapping_add(1)),
        }
    }
}

/// Sums and broadcasts over the ranks of a run. Every rank calls each method in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// The element-wise sum over the ranks of `x` (1-D f32), the same on every rank.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Rank 0's `x` (1-D f32), on every rank.
    fn broadcast(&self, x: &Tensor) -> Result<Tensor>;
    /// An error the transport noticed since the last call (NCCL reports a peer's failure
    /// asynchronously), after the last collective's result has been read.
    fn check_health(&self) -> Result<()> {
        Ok(())
    }
}

/// The single process of a run of one.
pub struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn broadcast(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// Sums `parts` (one per rank, in rank order) element by element: ((x₀ + x₁) + x₂) + …, the
/// order every host-side collective uses, so their results are bit-identical.
pub fn sum_in_rank_order(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        for (a, b) in acc.iter_mut().zip(p) {
            *a += b;
        }
    }
    acc
}

/// The tensors as one flat f32 vector, in order (what travels in one collective call).
pub fn flatten(parts: &[Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = parts
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// Splits `flat` back into tensors shaped and typed like `like` ([`flatten`]'s inverse).
pub fn unflatten(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let part = flat
                .narrow(0, at, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            at += n;
            Ok(part)
        })
        .collect()
}

/// Sums a step's gradients and loss sums (the loss, and distillation's parts) over the ranks:
/// one all-reduce of every gradient with the sums appended. Each rank's gradients are already
/// divided by the whole step's target count, so the sum is the gradient of the step's
/// token-weighted mean loss.
pub fn sum_step(
    comm: &dyn Collective,
    grads: Vec<Tensor>,
    sums: Vec<f64>,
) -> Result<(Vec<Tensor>, Vec<f64>)> {
    if comm.size() == 1 {
        return Ok((grads, sums));
    }
    let device = grads
        .first()
        .map(|g| g.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let appended: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
    let mut parts = grads;
    parts.push(Tensor::new(appended.as_slice(), &device)?);
    let _running = rendezvous::collective_running();
    let summed = comm.all_reduce_sum(&flatten(&parts)?)?;
    let mut out = unflatten(&summed, &parts)?;
    let sums = out
        .pop()
        .expect("sums appended")
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    wait_if_a_peer_failed();
    comm.check_health()?;
    Ok((out, sums))
}

/// Once a peer has failed, the watchdog is ending this process (its error message names the
/// rank): the sum just read may be garbage, so this thread goes no further — no update, no write.
pub fn wait_if_a_peer_failed() {
    while rendezvous::peer_failed() {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Makes every rank's `vars` equal rank 0's (at the start of a run: all ranks begin identical).
pub fn broadcast_vars(comm: &dyn Collective, vars: &[candle_core::Var]) -> Result<()> {
    if comm.size() == 1 || vars.is_empty() {
        return Ok(());
    }
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let from_root = comm.broadcast(&flatten(&tensors)?)?;
    for (v, t) in vars.iter().zip(unflatten(&from_root, &tensors)?) {
        v.set(&t)?;
    }
    Ok(())
}

/// This process as rank `world.rank` of a data-parallel run: its device (GPU `LOCAL_RANK`), the
/// collective (NCCL on CUDA, TCP on the CPU) and the watchdog that notices a peer leaving.
pub struct Member {
    pub device: candle_core::Device,
    pub comm: Box<dyn Collective>,
    watchdog: rendezvous::Watchdog,
}

impl Member {
    /// Meets the other ranks (the rendezvous) on the device `device_spec` names for this rank.
    pub fn join(device_spec: &str, world: &World, quiet: bool) -> Result<Self> {
        let device = crate::device::open_for_rank(device_spec, world.local_rank)?;
        let cuda = device.is_cuda();
        let mut session = rendezvous::Session::connect(world, cuda as u8, || make_id(cuda))?;
        let watchdog = session.watch()?;
        let comm: Box<dyn Collective> = if cuda {
            nccl_member(&device, &session)?
        } else {
            Box::new(session.tcp_collective())
        };
        if world.rank == 0 && !quiet {
            eprintln!(
                "distributed: {} ranks ({}), rank 0 at {}",
                world.size,
                if cuda { "NCCL" } else { "CPU, TCP sums" },
                world.master_addr
            );
        }
        Ok(Self {
            device,
            comm,
            watchdog,
        })
    }

    /// Ends this rank's part with the result of its work.
    pub fn finish<T>(self, result: Result<T>) -> Result<T> {
        match &result {
            Ok(_) => self.watchdog.finish(),
            // This rank's own error is the one to report: the peers' notes that follow (they
            // see this rank leave) must not end the process before it is printed.
            Err(_) => self.watchdog.stand_down(),
        }
        result
    }
}

fn make_id(cuda: bool) -> Result<[u8; rendezvous::ID_BYTES]> {
    if cuda {
        nccl::unique_id()
    } else {
        Ok([0; rendezvous::ID_BYTES])
    }
}

fn nccl_member(
    device: &candle_core::Device,
    session: &rendezvous::Session,
) -> Result<Box<dyn Collective>> {
    let w = &session.world;
    Ok(Box::new(nccl::NcclCollective::new(
        device, session.id, w.rank, w.size,
    )?))
}

/// A 64-bit hash of the adapter's values, checked equal on every rank (the ranks must not drift
/// apart: identical updates of identical weights). `None` in a run of one.
pub fn check_same_adapter(
    comm: &dyn Collective,
    vars: &[candle_core::Var],
    step: usize,
) -> Result<Option<u64>> {
    if comm.size() == 1 {
        return Ok(None);
    }
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let values = flatten(&tensors)?.to_vec1::<f32>()?;
    let hash = values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
    });
    // 16 bits a piece, so f32 carries each exactly.
    let pieces: Vec<f32> = (0..4)
        .map(|k| ((hash >> (16 * k)) & 0xFFFF) as f32)
        .collect();
    let mine = Tensor::from_vec(pieces.clone(), 4, &candle_core::Device::Cpu)?;
    let root = comm.broadcast(&mine)?.to_vec1::<f32>()?;
    wait_if_a_peer_failed();
    comm.check_health()?;
    if root != pieces {
        let root_hash = (0..4).fold(0u64, |h, k| h | ((root[k] as u64) << (16 * k)));
        return Err(KilnError::Train(format!(
            "step {step}: rank {}'s adapter (hash {hash:016x}) differs from rank 0's ({root_hash:016x}); the ranks diverged, which is a bug: please report it with the recipe",
            comm.rank()
        )));
    }
    Ok(Some(hash))
}

/// Refuses a run whose ranks read different data (other files, another tokenizer, other
/// settings): each rank compares its sequence and target counts and the hash of every token id
/// and loss mask (`TrainData::fingerprint`) with rank 0's.
pub fn check_same_data(comm: &dyn Collective, data: &crate::data::TrainData) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mine = data_summary(data);
    let n = mine.len();
    let root = comm
        .broadcast(&Tensor::from_vec(
            mine.clone(),
            n,
            &candle_core::Device::Cpu,
        )?)?
        .to_vec1::<f32>()?;
    match differing_data(&mine, &root) {
        None => Ok(()),
        Some(what) => Err(KilnError::Train(format!(
            "rank {} {what}; every rank must read the same data files and tokenizer",
            comm.rank()
        ))),
    }
}

/// Sequences, target tokens and the data hash in 16-bit pieces, which f32 carries exactly
/// (through a broadcast that moves f32).
fn data_summary(data: &crate::data::TrainData) -> Vec<f32> {
    let targets: usize = (0..data.sequences.len()).map(|s| data.num_targets(s)).sum();
    [
        data.sequences.len() as u64,
        targets as u64,
        data.fingerprint(),
    ]
    .iter()
    .flat_map(|&v| (0..4).map(move |k| ((v >> (16 * k)) & 0xFFFF) as f32))
    .collect()
}

/// How this rank's [`data_summary`] differs from rank 0's, in words (`None`: the same).
fn differing_data(mine: &[f32], root: &[f32]) -> Option<String> {
    if mine == root {
        return None;
    }
    let value =
        |p: &[f32], i: usize| (0..4).fold(0u64, |v, k| v | ((p[4 * i + k] as u64) << (16 * k)));
    let (sequences, targets) = (
        (value(mine, 0), value(mine, 1)),
        (value(root, 0), value(root, 1)),
    );
    Some(if sequences != targets {
        format!(
            "has {} training sequences with {} target tokens, rank 0 has {} with {}",
            sequences.0, sequences.1, targets.0, targets.1
        )
    } else {
        format!(
            "has as many sequences and target tokens as rank 0 ({} and {}) but other token ids or loss masks (data hash {:016x}, rank 0's {:016x})",
            sequences.0,
            sequences.1,
            value(mine, 2),
            value(root, 2)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks whose data have the same counts but another token are told apart by the hash,
    /// and counts that differ are named.
    #[test]
    fn ranks_with_other_data_are_told_apart() {
        use crate::data::{Example, TrainData};
        let data = |ids: Vec<u32>| {
            let mask = vec![false, true, true, true];
            TrainData::new(vec![Example::new(ids, mask)], false, 16)
        };
        let a = data_summary(&data(vec![1, 2, 3, 4]));
        assert_eq!(differing_data(&a, &a), None);
        let other = differing_data(&data_summary(&data(vec![1, 2, 9, 4])), &a).unwrap();
        assert!(
            other.contains("other token ids") && other.contains("(1 and 3)"),
            "{other}"
        );
        let mut longer = data(vec![1, 2, 3, 4]);
        longer
            .examples
            .push(Example::new(vec![5, 6], vec![false, true]));
        longer.sequences.push(vec![1]);
        let counts = differing_data(&data_summary(&longer), &a).unwrap();
        assert!(
            counts.contains("has 2 training sequences with 4 target tokens, rank 0 has 1 with 3"),
            "{counts}"
        );
    }
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<Option<World>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn the_world_comes_from_torchrun_slurm_or_open_mpi_variables() {
        assert_eq!(world(&[]).unwrap(), None);
        assert_eq!(world(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (3, 4, 1));
        assert_eq!((w.master_addr.as_str(), w.master_port), ("node7", 1234));
        let s = world(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.size, s.local_rank), (1, 2, 1));
        assert_eq!(
            (s.master_addr.as_str(), s.master_port),
            ("127.0.0.1", DEFAULT_MASTER_PORT)
        );
        let o = world(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")])
            .unwrap()
            .unwrap();
        assert_eq!((o.rank, o.local_rank), (0, 0));
        // Across hosts without MASTER_ADDR: refused, naming the fix.
        let e = world(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_NTASKS_PER_NODE", "8"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = world(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=2"), "{e}");
    }

    #[test]
    fn sums_run_in_rank_order() {
        // 1e8 + 1 rounds away in f32 unless the small values are added after the large ones
        // cancel: the order is part of the result, and every host-side collective keeps it.
        let parts = vec![vec![1e8f32, 1.0], vec![1.0, 2.0], vec![-1e8, 3.0]];
        assert_eq!(sum_in_rank_order(&parts), vec![0.0, 6.0]);
        let reordered = vec![parts[0].clone(), parts[2].clone(), parts[1].clone()];
        assert_eq!(sum_in_rank_order(&reordered), vec![1.0, 6.0]);
    }
}

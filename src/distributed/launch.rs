//! `kiln train --gpus N`: starts N copies of this command on this host, one per GPU, with the
//! variables torchrun would set, and waits for them. A rank that fails ends the others (their
//! watchdogs see it within seconds; stragglers are killed after [`GRACE`]).

use std::ffi::OsString;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::rendezvous::STOPPED_FOR_PEER;
use crate::error::{KilnError, Result};

/// How long the other ranks get to stop on their own after one fails.
const GRACE: Duration = Duration::from_secs(60);

/// Settings that keep NVLink multicast off (NVLS). A program that uses multicast can take a
/// host's shared GPUs out of service; kiln's all-reduce does not need it. Set where the user has
/// not set them.
pub const MULTICAST_OFF: [(&str, &str); 3] = [
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
];

/// A free TCP port on this host for the rendezvous.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| KilnError::Train(format!("no free local port for the rendezvous: {e}")))?;
    Ok(l.local_addr().map(|a| a.port()).unwrap_or(29500))
}

/// Runs `args` (this binary's arguments) as `n` ranks on this host. The children inherit this
/// process's environment, plus RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
/// MASTER_PORT, KILN_RENDEZVOUS_PORT and [`MULTICAST_OFF`].
pub fn run_local(n: usize, args: &[OsString]) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| {
        KilnError::Train(format!("cannot find kiln's own binary to start ranks: {e}"))
    })?;
    let port = free_port()?;
    let mut children: Vec<Child> = vec![];
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("KILN_RENDEZVOUS_PORT", port.to_string());
        for (k, v) in MULTICAST_OFF {
            if std::env::var_os(k).is_none() {
                cmd.env(k, v);
            }
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                stop(&mut children);
                return Err(KilnError::Train(format!("cannot start rank {rank}: {e}")));
            }
        }
    }
    wait_all(children)
}

fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for every rank. The error names the rank that failed first: a rank that stopped only
/// because another failed ([`STOPPED_FOR_PEER`]) is named only when no other failure is known.
fn wait_all(mut children: Vec<Child>) -> Result<()> {
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut failed_since: Option<Instant> = None;
    loop {
        for (rank, c) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Ok(Some(s)) = c.try_wait() {
                    status[rank] = Some(s);
                    if !s.success() {
                        failed_since.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        if status.iter().all(Option::is_some) {
            break;
        }
        if failed_since.is_some_and(|t| t.elapsed() > GRACE) {
            stop(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let failures: Vec<(usize, std::process::ExitStatus)> = status
        .iter()
        .enumerate()
        .filter_map(|(r, s)| s.filter(|s| !s.success()).map(|s| (r, s)))
        .collect();
    let cause = failures
        .iter()
        .find(|(_, s)| s.code() != Some(STOPPED_FOR_PEER))
        .or(failures.first());
    match cause {
        None => Ok(()),
        Some(&(rank, s)) => Err(KilnError::Train(format!(
            "rank {rank} {}; every rank has stopped (checkpoints are only ever written whole: resume with --resume)",
            describe(s)
        ))),
    }
}

fn describe(s: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            let name = match sig {
                9 => " (SIGKILL: killed, e.g. by the out-of-memory killer)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                6 => " (SIGABRT)",
                _ => "",
            };
            return format!("was killed by signal {sig}{name}");
        }
    }
    format!("exited with status {}", s.code().unwrap_or(-1))
}

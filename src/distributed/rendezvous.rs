//! How the ranks of a run find each other, and how a failure ends them all.
//!
//! Rank 0 listens on `MASTER_ADDR:`[`World::rendezvous_port`]; every other rank connects twice:
//! a control connection (rank 0 answers it with the NCCL unique id; afterwards it carries
//! heartbeats) and a data connection (the CPU collective's sums; unused on CUDA, where NCCL
//! carries them). The watchdog reads the control connections: a peer that exits, is killed, or
//! sends no heartbeat for [`SILENCE_LIMIT`] ends this process with an error naming the rank.
//! Rank 0 tells the others which rank failed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::{sum_in_rank_order, Collective, World};
use crate::error::{KilnError, Result};

const MAGIC: &[u8; 4] = b"KILN";
/// The NCCL unique id's size (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A peer silent this long (no heartbeat) counts as failed.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);

const BEAT: u8 = 1;
const DONE: u8 = 2;
const PEER_FAILED: u8 = 3;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Channel {
    Control = 0,
    Data = 1,
}

/// The connections of a distributed run, made before anything loads.
pub struct Session {
    pub world: World,
    /// What rank 0 handed out (the NCCL unique id on CUDA).
    pub id: [u8; ID_BYTES],
    /// Rank 0: one per rank (none for itself). Other ranks: rank 0's, at index 0.
    control: Vec<Option<TcpStream>>,
    data: Vec<Option<TcpStream>>,
}

fn timeout() -> Duration {
    let s = std::env::var("KILN_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(s)
}

fn net_err(what: String, e: std::io::Error) -> KilnError {
    KilnError::Train(format!("{what}: {e}"))
}

impl Session {
    /// Joins the run. Rank 0 calls `make_id` once and hands its bytes to every rank; `device_kind`
    /// (0 CPU, 1 CUDA) must be the same on every rank.
    pub fn connect(
        world: &World,
        device_kind: u8,
        make_id: impl FnOnce() -> Result<[u8; ID_BYTES]>,
    ) -> Result<Session> {
        let port = world.rendezvous_port()?;
        let deadline = Instant::now() + timeout();
        let n = world.size;
        let mut session = Session {
            world: world.clone(),
            id: [0; ID_BYTES],
            control: (0..n).map(|_| None).collect(),
            data: (0..n).map(|_| None).collect(),
        };
        if world.rank == 0 {
            session.id = make_id()?;
            let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                net_err(format!("rank 0 cannot listen on port {port} for kiln's rendezvous (MASTER_PORT + 1; set KILN_RENDEZVOUS_PORT to another free port)"), e)
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| net_err("rendezvous".into(), e))?;
            let mut missing = 2 * (n - 1);
            while missing > 0 {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| net_err("rendezvous".into(), e))?;
                        session.admit(stream, device_kind)?;
                        missing -= 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let absent: Vec<usize> = (1..n)
                                .filter(|&r| {
                                    session.control[r].is_none() || session.data[r].is_none()
                                })
                                .collect();
                            return Err(KilnError::Train(format!(
                                "rendezvous: ranks {absent:?} did not connect to port {port} within {}s (KILN_RENDEZVOUS_TIMEOUT); check that every rank started and can reach this host",
                                timeout().as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(net_err("rendezvous: accept".into(), e)),
                }
            }
        } else {
            let addr = format!("{}:{port}", world.master_addr);
            for channel in [Channel::Control, Channel::Data] {
                let mut stream = loop {
                    match TcpStream::connect(&addr) {
                        Ok(s) => break s,
                        Err(e) if Instant::now() > deadline => {
                            return Err(net_err(format!("rank {}: cannot reach rank 0's rendezvous at {addr} (MASTER_ADDR:MASTER_PORT+1, or KILN_RENDEZVOUS_PORT) within {}s", world.rank, timeout().as_secs()), e));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                };
                let _ = stream.set_nodelay(true);
                let mut hello = MAGIC.to_vec();
                hello.push(channel as u8);
                hello.push(device_kind);
                hello.extend((world.rank as u32).to_le_bytes());
                hello.extend((n as u32).to_le_bytes());
                stream
                    .write_all(&hello)
                    .map_err(|e| net_err(format!("rank {}: rendezvous", world.rank), e))?;
                if channel == Channel::Control {
                    let mut reply = [0u8; 4 + 1 + ID_BYTES];
                    stream.read_exact(&mut reply).map_err(|e| {
                        net_err(format!("rank {}: rendezvous with rank 0", world.rank), e)
                    })?;
                    if &reply[..4] != MAGIC {
                        return Err(KilnError::Train(format!("rank {}: {addr} is not a kiln rendezvous (another program on that port? set KILN_RENDEZVOUS_PORT)", world.rank)));
                    }
                    if reply[4] != 0 {
                        return Err(KilnError::Train(format!(
                            "rank {}: rank 0 refused it (its world size or device kind differs; every rank must run the same command)",
                            world.rank
                        )));
                    }
                    session.id.copy_from_slice(&reply[5..]);
                    session.control[0] = Some(stream);
                } else {
                    session.data[0] = Some(stream);
                }
            }
        }
        Ok(session)
    }

    /// Rank 0: reads a connecting rank's hello and files its stream.
    fn admit(&mut self, mut stream: TcpStream, device_kind: u8) -> Result<()> {
        let n = self.world.size;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut hello = [0u8; 4 + 2 + 8];
        stream
            .read_exact(&mut hello)
            .map_err(|e| net_err("rendezvous: a connection sent no hello".into(), e))?;
        let _ = stream.set_read_timeout(None);
        let rank = u32::from_le_bytes(hello[6..10].try_into().expect("4 bytes")) as usize;
        let size = u32::from_le_bytes(hello[10..14].try_into().expect("4 bytes")) as usize;
        if &hello[..4] != MAGIC {
            return Err(KilnError::Train(
                "rendezvous: something that is not a kiln rank connected to the port (set KILN_RENDEZVOUS_PORT to a free port)".into(),
            ));
        }
        let mismatch = if size != n {
            Some(format!(
                "rank {rank} was started with world size {size}, rank 0 with {n}"
            ))
        } else if hello[5] != device_kind {
            let kind = |k: u8| if k == 1 { "CUDA" } else { "the CPU" };
            Some(format!(
                "rank {rank} trains on {}, rank 0 on {}",
                kind(hello[5]),
                kind(device_kind)
            ))
        } else if rank == 0 || rank >= n {
            Some(format!("a second rank 0 or a rank {rank} outside 0..{n}"))
        } else {
            None
        };
        let channel = if hello[4] == 0 {
            Channel::Control
        } else {
            Channel::Data
        };
        if channel == Channel::Control {
            let mut reply = MAGIC.to_vec();
            reply.push(mismatch.is_some() as u8);
            reply.extend(self.id);
            let _ = stream.write_all(&reply);
        }
        if let Some(m) = mismatch {
            return Err(KilnError::Train(format!(
                "rendezvous: {m}; every rank must run the same command"
            )));
        }
        let slot = match channel {
            Channel::Control => &mut self.control[rank],
            Channel::Data => &mut self.data[rank],
        };
        *slot = Some(stream);
        Ok(())
    }

    /// Starts the watchdog over the control connections (heartbeats both ways).
    pub fn watch(&mut self) -> Result<Watchdog> {
        let finished = Arc::new(AtomicBool::new(false));
        let mut writers = vec![];
        let me = self.world.rank;
        for (peer, stream) in self.control.iter_mut().enumerate() {
            let Some(stream) = stream.take() else {
                continue;
            };
            let writer = stream
                .try_clone()
                .map_err(|e| net_err("watchdog".into(), e))?;
            writers.push((peer, writer));
            let finished = finished.clone();
            std::thread::spawn(move || watch_peer(me, peer, stream, finished));
        }
        let writers = Arc::new(Mutex::new(writers));
        *PEERS.lock().expect("peers") = Some(writers.clone());
        let (w, f) = (writers.clone(), finished.clone());
        let limit = collective_limit();
        std::thread::spawn(move || loop {
            std::thread::sleep(HEARTBEAT);
            if f.load(Ordering::SeqCst) {
                return;
            }
            let since = COLLECTIVE_SINCE.load(Ordering::SeqCst);
            if since != 0 && now_s().saturating_sub(since) > limit {
                fail(me, me, &format!("a gradient sum has waited {limit}s for the other ranks (KILN_COLLECTIVE_TIMEOUT): a rank is alive but stuck, or NCCL hung; stopping every rank"));
            }
            for (_, s) in w.lock().expect("writers").iter_mut() {
                let _ = s.write_all(&[BEAT]);
            }
        });
        Ok(Watchdog { writers, finished })
    }

    /// The CPU collective over the data connections.
    pub fn tcp_collective(&mut self) -> TcpCollective {
        TcpCollective {
            rank: self.world.rank,
            size: self.world.size,
            streams: Mutex::new(self.data.iter_mut().map(|s| s.take()).collect()),
        }
    }
}

type Writers = Arc<Mutex<Vec<(usize, TcpStream)>>>;

/// The control connections' writers, for telling the other ranks which rank failed.
static PEERS: Mutex<Option<Writers>> = Mutex::new(None);

/// Set once a peer has failed: the ranks' sums since may be garbage (a collective with a dead
/// peer need not report an error), so nothing more may be written.
static FAILED: AtomicBool = AtomicBool::new(false);

/// When this rank's current collective began (seconds since the epoch; 0: none running).
static COLLECTIVE_SINCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long one collective may wait before the run counts as hung: `KILN_COLLECTIVE_TIMEOUT`
/// seconds, default 900 (rank 0's evaluation and saves happen while the others wait in the next
/// sum, so this is generous).
fn collective_limit() -> u64 {
    std::env::var("KILN_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900)
}

/// Marks a collective as running until the guard drops; the watchdog ends a run whose
/// collective waits longer than [`collective_limit`] (a rank alive but stuck).
pub fn collective_running() -> impl Drop {
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            COLLECTIVE_SINCE.store(0, Ordering::SeqCst);
        }
    }
    COLLECTIVE_SINCE.store(now_s(), Ordering::SeqCst);
    Running
}

/// Whether a peer's failure is ending this process (see [`FAILED`]).
pub fn peer_failed() -> bool {
    FAILED.load(Ordering::SeqCst)
}

/// The exit status of a rank that stopped because another rank failed (the launcher reports the
/// rank that failed first, not these).
pub const STOPPED_FOR_PEER: i32 = 3;

/// Ends this process at once with `msg` and [`STOPPED_FOR_PEER`]. Rank 0 tells the other ranks
/// which rank failed. Nothing else runs: no destructor, no NCCL call (the main thread may be
/// inside a collective that will never complete; the driver ends its kernels with the process).
pub fn fail(me: usize, failed: usize, msg: &str) -> ! {
    FAILED.store(true, Ordering::SeqCst);
    eprintln!("error: rank {me}: {msg}");
    if let Ok(Some(peers)) = PEERS.try_lock().map(|p| p.clone()) {
        if let Ok(mut peers) = peers.try_lock() {
            let mut note = vec![PEER_FAILED];
            note.extend((failed as u32).to_le_bytes());
            for (_, s) in peers.iter_mut() {
                let _ = s.write_all(&note);
            }
        }
    }
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(STOPPED_FOR_PEER) }
}

fn watch_peer(me: usize, peer: usize, mut stream: TcpStream, finished: Arc<AtomicBool>) {
    let _ = stream.set_read_timeout(Some(SILENCE_LIMIT));
    let mut byte = [0u8; 1];
    loop {
        let got = stream.read(&mut byte);
        if finished.load(Ordering::SeqCst) {
            return;
        }
        match got {
            Ok(1) if byte[0] == BEAT => continue,
            Ok(1) if byte[0] == DONE => return,
            Ok(1) if byte[0] == PEER_FAILED => {
                let mut r = [0u8; 4];
                let failed = match stream.read_exact(&mut r) {
                    Ok(()) => u32::from_le_bytes(r) as usize,
                    Err(_) => peer,
                };
                fail(me, failed, &format!("stopping: rank {failed} failed (reported by rank {peer}); its own error is above"));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                fail(me, peer, &format!("rank {peer} sent no heartbeat for {}s (hung, or its host is unreachable); stopping every rank", SILENCE_LIMIT.as_secs()));
            }
            _ => fail(me, peer, &format!("rank {peer} exited or lost its connection before the run finished (killed, out of memory, or an error of its own above); stopping every rank")),
        }
    }
}

/// The running watchdog; [`Watchdog::finish`] at a normal end.
pub struct Watchdog {
    writers: Writers,
    finished: Arc<AtomicBool>,
}

impl Watchdog {
    /// This rank is ending on its own error: it stops watching (its peers see it leave).
    pub fn stand_down(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }

    /// The run ended normally here: peers stop watching this rank, and this rank stops watching.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        for (_, s) in self.writers.lock().expect("writers").iter_mut() {
            let _ = s.write_all(&[DONE]);
        }
    }
}

/// Sums between CPU processes: the ranks send their vectors to rank 0, which adds them in rank
/// order ([`sum_in_rank_order`]) and sends the sum back.
pub struct TcpCollective {
    rank: usize,
    size: usize,
    /// Rank 0: one per rank (none for itself); other ranks: rank 0's at index 0.
    streams: Mutex<Vec<Option<TcpStream>>>,
}

fn send(s: &mut TcpStream, v: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 4 * v.len());
    bytes.extend((v.len() as u64).to_le_bytes());
    for x in v {
        bytes.extend(x.to_le_bytes());
    }
    s.write_all(&bytes)
}

fn receive(s: &mut TcpStream) -> std::io::Result<Vec<f32>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut bytes = vec![0u8; 4 * u64::from_le_bytes(len) as usize];
    s.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

impl TcpCollective {
    fn exchange(&self, x: &Tensor, combine: impl Fn(&[Vec<f32>]) -> Vec<f32>) -> Result<Tensor> {
        let mine = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut streams = self.streams.lock().expect("streams");
        // A connection that breaks mid-sum means its rank is gone: stop as the watchdog would.
        let gone = |peer: usize, e: std::io::Error| -> ! {
            fail(
                self.rank,
                peer,
                &format!("rank {peer} exited or lost its connection during a gradient sum ({e}); stopping every rank"),
            )
        };
        let out = if self.rank == 0 {
            let mut parts = vec![mine];
            for (peer, s) in streams.iter_mut().enumerate().skip(1) {
                let s = s.as_mut().expect("every rank connected");
                parts.push(receive(s).unwrap_or_else(|e| gone(peer, e)));
            }
            if let Some(bad) = parts.iter().position(|p| p.len() != parts[0].len()) {
                return Err(KilnError::Train(format!(
                    "collective: rank {bad} sent {} values, rank 0 has {}; the ranks run different models or recipes",
                    parts[bad].len(),
                    parts[0].len()
                )));
            }
            let out = combine(&parts);
            for (peer, s) in streams.iter_mut().enumerate().skip(1) {
                let s = s.as_mut().expect("every rank connected");
                send(s, &out).unwrap_or_else(|e| gone(peer, e));
            }
            out
        } else {
            let s = streams[0].as_mut().expect("connected to rank 0");
            send(s, &mine).unwrap_or_else(|e| gone(0, e));
            receive(s).unwrap_or_else(|e| gone(0, e))
        };
        let n = out.len();
        Ok(Tensor::from_vec(out, n, x.device())?)
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.exchange(x, sum_in_rank_order)
    }
    fn broadcast(&self, x: &Tensor) -> Result<Tensor> {
        self.exchange(x, |parts| parts[0].clone())
    }
}

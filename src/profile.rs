//! `KILN_PROFILE=1`: wall time per named region of the training step, with the device
//! synchronized at each region's start and end, and the most device memory in use at a region's
//! end; printed after each step. For finding
//! where GPU time goes; off (and free) by default.
//!
//! `KILN_PROFILE=host`: no synchronization added; per step, the host's time enqueueing the
//! micro-batches and its time waiting for the device to finish them (the step's one read back),
//! and per region the host's enqueue time beside the device's time between the region's first
//! and last launch (CUDA events). A device time well above the kernels' sum is the device
//! waiting on the host, or on launches.
//!
//! `KILN_CUDA_PROFILE_STEP=N` brackets training step N (1-based, whole step including the
//! optimizer) with `cuProfilerStart`/`cuProfilerStop`, so that a kernel profiler started with
//! profiling off (`ncu --profile-from-start off`) records exactly one steady-state step;
//! `scripts/kernel_profile.py` runs it and sums the kernels by name.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::cuda::Event;

/// Where the reports also go (a run's `profile.txt`, which `kiln report` reads), beside stderr.
static SINK: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// Sends the reports to `path` too (started empty), when profiling is on.
pub fn write_to(path: &std::path::Path) {
    if enabled() || host_enabled() {
        let _ = std::fs::write(path, "");
        *SINK.lock().unwrap() = Some(path.to_path_buf());
    }
}

/// One report line, to stderr and the sink.
fn emit(line: String) {
    eprintln!("{line}");
    if let Some(path) = SINK.lock().unwrap().as_ref() {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Per region: total time, calls, and the most device memory in use at its end (bytes).
static TIMES: Mutex<BTreeMap<&'static str, (Duration, usize, usize)>> = Mutex::new(BTreeMap::new());

/// Device memory in use (CUDA: total minus free, as the driver counts it).
fn device_memory_used(device: &Device) -> usize {
    crate::cuda::memory_in_use(device).unwrap_or(0)
}

pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KILN_PROFILE").is_some_and(|v| v != "host"))
}

/// Whether `KILN_PROFILE=host` asks for the host's enqueue and wait times.
pub fn host_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_PROFILE").as_deref() == Ok("host"))
}

/// Prints one line of host phase times, and the event-timed regions since the last report
/// summed by name: host enqueue time / device time (`KILN_PROFILE=host`).
pub fn host_report(phases: &[(&str, Duration)]) {
    if !host_enabled() {
        return;
    }
    let mut line: Vec<String> = phases
        .iter()
        .map(|(name, d)| format!("{name} {:.1} ms", d.as_secs_f64() * 1e3))
        .collect();
    EVENT_REGIONS.with(|r| {
        let mut by_name: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        for (name, host, start, end) in r.borrow_mut().drain(..) {
            let device = start.elapsed_ms(&end);
            let e = by_name.entry(name).or_default();
            e.0 += host.as_secs_f64() * 1e3;
            e.1 += device;
        }
        for (name, (host, device)) in by_name {
            line.push(format!("{name} host {host:.1} / device {device:.1} ms"));
        }
    });
    emit(format!("profile host: {}", line.join(", ")));
}

/// A timed region; its time is added to `name` when it is dropped.
pub struct Scope {
    name: &'static str,
    device: Device,
    start: Instant,
    start_event: Option<Event>,
}

pub fn scope(name: &'static str, device: &Device) -> Option<Scope> {
    if host_enabled() {
        return Some(Scope {
            name,
            device: device.clone(),
            start: Instant::now(),
            start_event: Event::record(device),
        });
    }
    if !enabled() {
        return None;
    }
    let _ = device.synchronize();
    Some(Scope {
        name,
        device: device.clone(),
        start: Instant::now(),
        start_event: None,
    })
}

/// Regions timed by events, read at the next report (`KILN_PROFILE=host`): name, host enqueue
/// time, and the events around the region.
type EventRegion = (&'static str, Duration, Event, Event);

thread_local! {
    static EVENT_REGIONS: std::cell::RefCell<Vec<EventRegion>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for Scope {
    fn drop(&mut self) {
        if host_enabled() {
            if let (Some(start), Some(end)) = (self.start_event.take(), Event::record(&self.device))
            {
                let host = self.start.elapsed();
                EVENT_REGIONS.with(|r| r.borrow_mut().push((self.name, host, start, end)));
            }
            return;
        }
        let _ = self.device.synchronize();
        let mut t = TIMES.lock().unwrap();
        let e = t.entry(self.name).or_default();
        e.0 += self.start.elapsed();
        e.1 += 1;
        e.2 = e.2.max(device_memory_used(&self.device));
    }
}

/// Prints and clears the accumulated times.
pub fn report() {
    if !enabled() {
        return;
    }
    let mut t = TIMES.lock().unwrap();
    for (name, (d, n, mem)) in t.iter() {
        emit(format!(
            "profile {name:28} {:9.1} ms  {n:6} calls  {:7.2} GiB in use at most",
            d.as_secs_f64() * 1e3,
            *mem as f64 / (1u64 << 30) as f64
        ));
    }
    t.clear();
}

/// Starts the CUDA profiler's capture at the step `KILN_CUDA_PROFILE_STEP` names; the capture
/// stops when the returned guard drops.
pub fn capture_step(step: usize, device: &Device) -> Option<Capture> {
    let wanted = std::env::var("KILN_CUDA_PROFILE_STEP")
        .ok()?
        .parse::<usize>()
        .ok()?;
    if wanted != step || !device.is_cuda() {
        return None;
    }
    let _ = device.synchronize();
    crate::cuda::profiler_start();
    Some(Capture {
        device: device.clone(),
    })
}

pub struct Capture {
    device: Device,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        crate::cuda::profiler_stop();
    }
}

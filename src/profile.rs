//! `KILN_PROFILE=1`: wall time per named region of the training step, with the device
//! synchronized at each region's start and end, printed when the process ends a step. For finding
//! where GPU time goes; off (and free) by default.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;

static TIMES: Mutex<BTreeMap<&'static str, (Duration, usize)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KILN_PROFILE").is_some())
}

/// A timed region; its time is added to `name` when it is dropped.
pub struct Scope {
    name: &'static str,
    device: Device,
    start: Instant,
}

pub fn scope(name: &'static str, device: &Device) -> Option<Scope> {
    if !enabled() {
        return None;
    }
    let _ = device.synchronize();
    Some(Scope {
        name,
        device: device.clone(),
        start: Instant::now(),
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        let mut t = TIMES.lock().unwrap();
        let e = t.entry(self.name).or_default();
        e.0 += self.start.elapsed();
        e.1 += 1;
    }
}

/// Prints and clears the accumulated times.
pub fn report() {
    if !enabled() {
        return;
    }
    let mut t = TIMES.lock().unwrap();
    for (name, (d, n)) in t.iter() {
        eprintln!(
            "profile {name:28} {:9.1} ms  {n:6} calls",
            d.as_secs_f64() * 1e3
        );
    }
    t.clear();
}

//! Progress bars for every long phase: loading and quantizing the base, tokenizing the data,
//! evaluation, export, calibration and merge (the training loop has its own line). Each shows
//! its rate and ETA; all are hidden under a command's `-q` ([`set_quiet`]), with `--json`, and
//! when stderr is not a terminal (indicatif draws nothing there).

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Hides every bar this process draws from now on (`-q`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar of `total` `unit`s with elapsed time, rate and ETA; hidden when `hidden` (JSON output,
/// quiet) or after [`set_quiet`].
pub fn bar(total: usize, unit: &str, hidden: bool) -> ProgressBar {
    if hidden || QUIET.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64).with_finish(indicatif::ProgressFinish::AndClear);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}

//! Progress bars for long work outside the training loop (evaluation, export, quantization).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `total` `unit`s with elapsed time and ETA; hidden when `hidden` (JSON output, quiet).
pub fn bar(total: usize, unit: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  ETA {{eta}}"
        ))
        .expect("valid template"),
    );
    bar
}

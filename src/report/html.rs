//! `kiln report`: one self-contained HTML page of one or more runs. Every curve is inline SVG,
//! every style inline CSS; there is no script, font or image to fetch, and the page's content
//! security policy forbids fetching any (it opens on a laptop with the run folder copied over).
//!
//! Each metric of `metrics.jsonl` gets one chart: steps across, the raw values as a thin line and
//! an exponential moving average (TensorBoard's smoothing, 0.6) as a bold one, on a log scale when
//! the values are positive and span more than 20x. Several runs are overlaid, a colour each. Each
//! curve carries `data-metric`, `data-run` and `data-points`, so a reader (or a test driving a
//! browser) can count curves and points from the DOM.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{KilnError, Result};

/// One run folder, as `kiln train` left it.
pub struct RunFolder {
    pub name: String,
    pub dir: PathBuf,
    /// `metrics.jsonl`, line by line.
    pub lines: Vec<Value>,
    /// `recipe.toml`, as the run saved it.
    pub recipe: Option<toml::Table>,
    /// `samples.jsonl`: step, prompt, text.
    pub samples: Vec<Value>,
    /// `profile.txt` (a run with `KILN_PROFILE` set): each region's time summed over the run.
    pub profile: Vec<(String, f64)>,
}

impl RunFolder {
    pub fn read(dir: &Path) -> Result<Self> {
        let metrics = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).map_err(|e| {
            KilnError::Usage(format!(
                "{}: not a run folder ({e}); give the output.dir of a `kiln train` run",
                metrics.display()
            ))
        })?;
        let jsonl = |text: &str| -> Vec<Value> {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        let samples = std::fs::read_to_string(dir.join("samples.jsonl")).unwrap_or_default();
        let recipe = std::fs::read_to_string(dir.join("recipe.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok());
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let profile = std::fs::read_to_string(dir.join("profile.txt")).unwrap_or_default();
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            lines: jsonl(&text),
            recipe,
            samples: jsonl(&samples),
            profile: profile_totals(&profile),
        })
    }

    /// Each metric's `(step, value)` points, in step order, training and evaluation alike.
    pub fn series(&self) -> BTreeMap<String, Vec<(f64, f64)>> {
        let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for line in &self.lines {
            let Some(step) = line["step"].as_f64() else {
                continue;
            };
            for (k, v) in line.as_object().into_iter().flatten() {
                if NOT_CURVES.contains(&k.as_str()) {
                    continue;
                }
                if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                    out.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
        for points in out.values_mut() {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        out
    }

    fn setting(&self, path: &str) -> Option<String> {
        let mut v: Option<&toml::Value> = None;
        for (i, key) in path.split('.').enumerate() {
            v = match (i, v) {
                (0, _) => self.recipe.as_ref()?.get(key),
                (_, Some(toml::Value::Table(t))) => t.get(key),
                _ => None,
            };
        }
        v.map(|v| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// `KILN_PROFILE=1`'s lines (`profile NAME  X ms  N calls ...`), each region's milliseconds
/// summed over the run, largest first.
fn profile_totals(text: &str) -> Vec<(String, f64)> {
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("profile"), Some(name), Some(ms), Some("ms")) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        if let Ok(ms) = ms.parse::<f64>() {
            *totals.entry(name.to_string()).or_default() += ms;
        }
    }
    let mut v: Vec<(String, f64)> = totals.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Numbers of a metrics line that are bookkeeping, not curves.
const NOT_CURVES: [&str; 3] = ["step", "epoch", "elapsed_s"];

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];
const SMOOTHING: f64 = 0.6;
const WIDTH: f64 = 520.0;
const HEIGHT: f64 = 240.0;
const MARGIN: (f64, f64, f64, f64) = (56.0, 12.0, 12.0, 28.0); // left, right, top, bottom

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// TensorBoard's smoothing: an exponential moving average, debiased at the start.
fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut weight = 0.0;
    points
        .iter()
        .map(|&(x, y)| {
            last = last * SMOOTHING + (1.0 - SMOOTHING) * y;
            weight = weight * SMOOTHING + (1.0 - SMOOTHING);
            (x, last / weight)
        })
        .collect()
}

/// A value's label: few digits, scientific when tiny or huge.
fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{:.3}", v)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// One chart: every run's curve of `metric`.
fn chart(metric: &str, runs: &[(&str, &[(f64, f64)])]) -> String {
    let all: Vec<(f64, f64)> = runs.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let log = y0 > 0.0 && y1 / y0 > 20.0;
    let ty = |y: f64| if log { y.ln() } else { y };
    let (ly0, ly1) = (ty(y0), ty(y1));
    let (ly0, ly1) = if ly1 - ly0 < 1e-12 {
        (ly0 - 0.5, ly1 + 0.5)
    } else {
        (ly0, ly1)
    };
    let (x0, x1) = if x1 - x0 < 1e-12 {
        (x0 - 0.5, x1 + 0.5)
    } else {
        (x0, x1)
    };
    let (ml, mr, mt, mb) = MARGIN;
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * (WIDTH - ml - mr);
    let py = |y: f64| mt + (1.0 - (ty(y) - ly0) / (ly1 - ly0)) * (HEIGHT - mt - mb);
    let mut svg = String::new();
    let scale = if log { "log scale" } else { "" };
    let _ = write!(
        svg,
        r##"<figure class="chart"><figcaption>{} <span class="scale">{scale}</span></figcaption><svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}">"##,
        escape(metric),
        escape(metric)
    );
    // Axes, with five labelled values up the side and the first and last step below.
    let _ = write!(
        svg,
        r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" class="frame"/>"##,
        WIDTH - ml - mr,
        HEIGHT - mt - mb
    );
    for i in 0..5 {
        let f = i as f64 / 4.0;
        let ly = ly0 + f * (ly1 - ly0);
        let y = if log { ly.exp() } else { ly };
        let yy = py(y);
        let _ = write!(
            svg,
            r##"<line x1="{ml}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" class="grid"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"##,
            WIDTH - mr,
            ml - 4.0,
            yy + 4.0,
            label(y)
        );
    }
    for (x, anchor) in [(x0, "start"), (x1, "end")] {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{}" class="tick" text-anchor="{anchor}">step {}</text>"##,
            px(x),
            HEIGHT - 8.0,
            label(x)
        );
    }
    for (i, (run, points)) in runs.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path = |pts: &[(f64, f64)]| -> String {
            pts.iter()
                .enumerate()
                .map(|(k, &(x, y))| {
                    format!(
                        "{}{:.1},{:.1}",
                        if k == 0 { "M" } else { "L" },
                        px(x),
                        py(y)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let attrs = format!(
            r##"data-metric="{}" data-run="{}" data-points="{}" stroke="{colour}""##,
            escape(metric),
            escape(run),
            points.len()
        );
        if points.len() == 1 {
            let (x, y) = points[0];
            let _ = write!(
                svg,
                r##"<circle class="curve point" {attrs} fill="{colour}" cx="{:.1}" cy="{:.1}" r="3"/>"##,
                px(x),
                py(y)
            );
            continue;
        }
        let _ = write!(
            svg,
            r##"<path class="curve raw" {attrs} d="{}"/>"##,
            path(points)
        );
        let _ = write!(
            svg,
            r##"<path class="smooth" data-metric="{}" data-run="{}" stroke="{colour}" d="{}"/>"##,
            escape(metric),
            escape(run),
            path(&smoothed(points))
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// The settings a reader compares runs by, and what the run did.
fn summary(run: &RunFolder) -> Vec<(&'static str, String)> {
    let s = |k: &str| run.setting(k).unwrap_or_else(|| "—".into());
    let last = |key: &str| run.lines.iter().rev().find_map(|l| l[key].as_f64());
    let tokens: f64 = run.lines.iter().filter_map(|l| l["tokens"].as_f64()).sum();
    let best = run
        .lines
        .iter()
        .filter_map(|l| Some((l["eval_loss"].as_f64()?, l["step"].as_u64()?)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let method = run
        .setting("training.method")
        .unwrap_or_else(|| "sft".into());
    vec![
        ("model", s("model.path")),
        ("device", s("model.device")),
        ("method", method),
        ("data", s("data.path")),
        ("max_seq_len", s("data.max_seq_len")),
        (
            "LoRA r / alpha",
            format!("{} / {}", s("lora.r"), s("lora.lora_alpha")),
        ),
        ("target modules", s("lora.target_modules")),
        ("learning rate", s("training.learning_rate")),
        (
            "micro-batch × accumulation",
            format!(
                "{} × {}",
                s("training.micro_batch_size"),
                s("training.gradient_accumulation_steps")
            ),
        ),
        ("steps", last("step").map_or("—".into(), label)),
        ("tokens seen", format!("{tokens:.0}")),
        (
            "time",
            last("elapsed_s").map_or("—".into(), |t| format!("{t:.1} s")),
        ),
        (
            "final loss",
            last("loss").map_or("—".into(), |v| format!("{v:.4}")),
        ),
        (
            "best eval loss",
            best.map_or("—".into(), |(l, step)| format!("{l:.4} at step {step}")),
        ),
        ("where the time went", time_went(&run.profile)),
    ]
}

/// The profiled regions' shares of the run's profiled time (`KILN_PROFILE=1`), the largest six.
fn time_went(profile: &[(String, f64)]) -> String {
    if profile.is_empty() {
        return "— (profile with KILN_PROFILE=1)".into();
    }
    let total: f64 = profile.iter().map(|p| p.1).sum();
    profile
        .iter()
        .take(6)
        .map(|(name, ms)| format!("{name} {:.0}%", 100.0 * ms / total.max(1e-9)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The page for `runs`.
pub fn render(runs: &[RunFolder]) -> String {
    let series: Vec<BTreeMap<String, Vec<(f64, f64)>>> = runs.iter().map(|r| r.series()).collect();
    let mut metrics: Vec<&String> = series.iter().flat_map(|s| s.keys()).collect();
    metrics.sort_by_key(|m| (metric_rank(m), m.to_string()));
    metrics.dedup();
    let mut html = String::new();
    let title = runs
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(
        html,
        r##"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kiln report: {}</title><style>{STYLE}</style></head><body>
<h1>kiln report</h1><p class="legend">"##,
        escape(&title)
    );
    for (i, r) in runs.iter().enumerate() {
        let _ = write!(
            html,
            r##"<span class="key" style="background:{}"></span>{} "##,
            COLOURS[i % COLOURS.len()],
            escape(&r.name)
        );
    }
    html.push_str("</p><h2>Curves</h2><p class=\"note\">Thin: every logged value. Bold: smoothed (moving average, 0.6).</p><div class=\"charts\">");
    for m in &metrics {
        let curves: Vec<(&str, &[(f64, f64)])> = runs
            .iter()
            .zip(&series)
            .filter_map(|(r, s)| s.get(*m).map(|p| (r.name.as_str(), p.as_slice())))
            .collect();
        html.push_str(&chart(m, &curves));
    }
    html.push_str("</div><h2>Runs</h2><table><tr><th></th>");
    for r in runs {
        let _ = write!(html, "<th>{}</th>", escape(&r.name));
    }
    html.push_str("</tr>");
    let rows: Vec<Vec<(&str, String)>> = runs.iter().map(summary).collect();
    for (k, (name, _)) in rows[0].iter().enumerate() {
        let _ = write!(html, "<tr><th>{name}</th>");
        for r in &rows {
            let _ = write!(html, "<td>{}</td>", escape(&r[k].1));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    for r in runs.iter().filter(|r| !r.samples.is_empty()) {
        let _ = write!(html, "<h2>Samples: {}</h2>", escape(&r.name));
        for s in &r.samples {
            let _ = write!(
                html,
                "<div class=\"sample\"><div class=\"meta\">step {}</div><div class=\"prompt\">{}</div><pre>{}</pre></div>",
                s["step"],
                escape(s["prompt"].as_str().unwrap_or_default()),
                escape(s["text"].as_str().unwrap_or_default())
            );
        }
    }
    html.push_str("</body></html>\n");
    html
}

/// Training loss first, then the other training metrics, then evaluation.
fn metric_rank(m: &str) -> u8 {
    match m {
        "loss" => 0,
        _ if m.starts_with("eval_") => 3,
        "lr" | "grad_norm" | "tokens_per_s" | "tokens" | "target_tokens" => 2,
        _ => 1,
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}h2{font-size:16px;margin-top:28px}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{margin:0;border:1px solid #ddd;padding:6px}figcaption{font-weight:600}\
.scale{font-weight:400;color:#888;font-size:12px}.frame{fill:none;stroke:#bbb}.grid{stroke:#eee}.tick{font-size:10px;fill:#666}\
.raw{fill:none;stroke-width:1;opacity:.35}.smooth{fill:none;stroke-width:2}.key{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}\
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f6f6}\
.sample{border-left:3px solid #ccc;padding-left:8px;margin:8px 0}.meta{color:#888;font-size:12px}.prompt{font-weight:600}pre{white-space:pre-wrap;margin:4px 0}.note{color:#666}";

/// Writes the page for the run folders `dirs` to `out`.
pub fn write_report(dirs: &[PathBuf], out: &Path) -> Result<usize> {
    let runs = dirs
        .iter()
        .map(|d| RunFolder::read(d))
        .collect::<Result<Vec<_>>>()?;
    if runs.is_empty() {
        return Err(KilnError::Usage(
            "kiln report: give at least one run folder".into(),
        ));
    }
    let html = render(&runs);
    crate::io::write_atomic(out, html.as_bytes())?;
    Ok(runs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_lines_sum_by_region() {
        let text = "profile forward      10.0 ms  3 calls  1.00 GiB in use at most\nprofile loss 5.5 ms 1 calls\nprofile forward 2.0 ms 1 calls\nother line";
        assert_eq!(
            profile_totals(text),
            vec![("forward".to_string(), 12.0), ("loss".to_string(), 5.5)]
        );
        assert_eq!(time_went(&profile_totals(text)), "forward 69%, loss 31%");
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_average() {
        let s = smoothed(&[(1.0, 1.0), (2.0, 3.0)]);
        assert_eq!(s[0].1, 1.0);
        // (0.4·1·0.6 + 0.4·3) / (0.4·0.6 + 0.4) = 1.44 / 0.64
        assert!((s[1].1 - 2.25).abs() < 1e-12);
    }
}

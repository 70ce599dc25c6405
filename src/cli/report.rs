//! `kiln report`: one self-contained HTML page of one or more runs' curves, settings and samples.

use std::path::PathBuf;

use kiln::error::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Run folders (a recipe's output.dir); several are overlaid, a colour each.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where to write the page (default: RUN/report.html for one run, report.html for several).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn exec(args: Args) -> Result<()> {
    let out = args.output.unwrap_or_else(|| match args.runs.as_slice() {
        [one] => one.join("report.html"),
        _ => PathBuf::from("report.html"),
    });
    let n = kiln::report::html::write_report(&args.runs, &out)?;
    println!(
        "{} ({n} run{})",
        out.display(),
        if n == 1 { "" } else { "s" }
    );
    Ok(())
}

//! `fmboost check-golden FILE...`: one line per check, `<file> <check> rel_err=<x> ok|FAIL`;
//! non-zero exit when any check fails or a file is not understood.

use std::path::PathBuf;
use std::process::ExitCode;

use fmboost_models::device::{parse_device, parse_dtype};
use fmboost_models::golden::{check_file, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Golden safetensors files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32`, `f16` or `bf16` (tolerances widen for half precision).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = parse_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let dtype = parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let options = RunOptions { device, dtype };
    let mut failed = false;
    for path in &args.files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
        match check_file(path, &options) {
            Ok(checks) => {
                for check in checks {
                    let verdict = if check.ok() { "ok" } else { "FAIL" };
                    failed |= !check.ok();
                    println!("{name} {} rel_err={:.3e} {verdict}", check.name, check.rel_err);
                }
            }
            Err(err) => {
                failed = true;
                println!("{name} - FAIL ({err})");
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

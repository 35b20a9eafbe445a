//! `fmboost check-golden FILE...`: one line per check, `<file> <check> rel_err=<x> tol=<t> ok|FAIL`
//! (with `--json`, one JSON object per line with the same fields, device and dtype); non-zero exit when any check fails or a file is not understood. The tolerance depends on the
//! dtype (`RunOptions::forward_tolerance` / `loop_tolerance`); stderr says which applied.

use std::path::PathBuf;
use std::process::ExitCode;

use fmboost_models::device::{parse_device, parse_dtype};
use fmboost_models::golden::{check_file, Check, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Golden safetensors files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32`, `f16` or `bf16`. Tolerances (relative error): f32 1e-4 per forward pass and 1e-3
    /// per multi-step loop; bf16 and f16 2e-2 and 5e-2.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// One JSON object per check (file, check, rel_err, tolerance, ok, device, dtype) instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = parse_device(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let dtype = parse_dtype(&args.dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if device.is_cpu() && matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) {
        anyhow::bail!("--dtype {}: half precision runs only on CUDA (candle's CPU matmuls and convolutions have no half kernels)", args.dtype);
    }
    let options = RunOptions { device, dtype };
    eprintln!(
        "check-golden: device {}, dtype {}: tolerance {:.0e} per forward pass, {:.0e} per multi-step loop",
        args.device,
        args.dtype,
        options.forward_tolerance(),
        options.loop_tolerance()
    );
    let mut failed = false;
    // One line per check (or per file not understood); true when it passed.
    let report = |file: &str, outcome: Result<&Check, String>| -> bool {
        let ok = outcome.as_ref().is_ok_and(|check| check.ok());
        match (&outcome, args.json) {
            (Ok(check), true) => println!(
                "{}",
                serde_json::json!({"file": file, "check": check.name, "rel_err": check.rel_err, "tolerance": check.tolerance,
                    "ok": ok, "device": args.device, "dtype": args.dtype})
            ),
            (Err(error), true) => println!(
                "{}",
                serde_json::json!({"file": file, "check": null, "error": error, "ok": false, "device": args.device, "dtype": args.dtype})
            ),
            (Ok(check), false) => {
                let verdict = if ok { "ok" } else { "FAIL" };
                println!("{file} {} rel_err={:.3e} tol={:.0e} {verdict}", check.name, check.rel_err, check.tolerance);
            }
            (Err(error), false) => println!("{file} - FAIL ({error})"),
        }
        ok
    };
    for path in &args.files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
        match check_file(path, &options) {
            Ok(checks) => {
                for check in &checks {
                    failed |= !report(&name, Ok(check));
                }
            }
            Err(err) => failed |= !report(&name, Err(err.to_string())),
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

//! Every command that takes `--device` turns `cuda:0` on a build without the `cuda` feature into
//! one line naming the flag and what is missing, with nothing written: `fmboost` (generate,
//! upscale, check-golden, bench, eval, train) and the three worker binaries. Where the
//! message appears shows that the flag reaches the device selection of each command.
#![cfg(not(feature = "cuda"))]

use std::path::{Path, PathBuf};
use std::process::Command;

fn fmboost() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fmboost"))
}

/// The workspace's other binaries sit beside `fmboost` (`cargo build --workspace --bins`, as
/// scripts/test.sh does first); a missing one fails the test, it is never skipped.
fn sibling_binary(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_fmboost")).parent().unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(path.is_file(), "{} missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Runs the command, expects exit status 1 (not clap's usage error, 2: every other flag was
/// accepted) and a single stderr line naming `--device cuda:0` and the missing CUDA build.
fn assert_refuses_cuda(what: &str, command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected:\n{stderr}");
    let line = lines[0];
    assert!(line.contains("--device") && line.contains("`cuda:0`"), "{what}: {line}");
    assert!(line.contains("built without CUDA") && line.contains("--features cuda"), "{what}: {line}");
    assert!(output.stdout.is_empty(), "{what}: wrote to stdout: {}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn fmboost_commands_refuse_cuda_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("in.png");
    image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 7])).save(&png).unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 90])).save(photos.join("a.png")).unwrap();
    let out = dir.path().join("out.png");
    let golden = dir.path().join("any.safetensors");
    let (png, photos, out, golden) = (png.to_str().unwrap(), photos.to_str().unwrap(), out.to_str().unwrap(), golden.to_str().unwrap());
    let train_out = dir.path().join("train");
    let train_out = train_out.to_str().unwrap();

    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("generate", vec!["generate", "--seed", "1", "--out", out]),
        ("upscale", vec!["upscale", png, "--scale", "2", "--out", out]),
        ("check-golden f32", vec!["check-golden", golden, "--dtype", "f32"]),
        ("check-golden bf16", vec!["check-golden", golden, "--dtype", "bf16"]),
        ("bench cfm", vec!["bench", "cfm", "--config", "paper", "--latent", "128", "--dtype", "bf16"]),
        ("bench decode", vec!["bench", "decode", "--latent", "16"]),
        ("eval upscale", vec!["eval", "upscale", "--scale", "2", "--data", photos]),
        ("train autoencoder", vec!["train", "autoencoder", "--data", photos, "--out", train_out, "--steps", "1"]),
    ];
    for (what, args) in cases {
        assert_refuses_cuda(what, fmboost().args(&args).args(["--device", "cuda:0"]));
    }
    assert!(!Path::new(out).exists(), "nothing written on failure");
    assert!(!Path::new(train_out).join("checkpoint.safetensors").exists());
}

#[test]
fn workers_refuse_cuda_with_one_line() {
    for stage in ["diffusion", "cfm", "decoder"] {
        let binary = sibling_binary(&format!("fmboost-worker-{stage}"));
        // The device is opened before Redis is dialled: an unreachable URL must not matter.
        let mut command = Command::new(binary);
        command.args(["--redis", "redis://127.0.0.1:1", "--profile", "tiny", "--device", "cuda:0"]).env("RUST_LOG", "error");
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stage}: {stderr}");
        let line = stderr.lines().find(|l| l.contains("--device")).unwrap_or_else(|| panic!("{stage}: no --device line:\n{stderr}"));
        assert!(line.contains("`cuda:0`") && line.contains("built without CUDA"), "{stage}: {line}");
    }
}

#[test]
fn check_golden_refuses_half_precision_on_the_cpu_and_reports_json() {
    let golden = std::env::var("FMBOOST_GOLDEN_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden")
    });
    let file = golden.join("cfm_unet_a.safetensors");
    assert!(file.is_file(), "{} missing (set FMBOOST_GOLDEN_DIR)", file.display());
    let output = fmboost().args(["check-golden", "--dtype", "bf16", file.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--dtype bf16") && stderr.contains("only on CUDA"), "{stderr}");

    let output = fmboost().args(["check-golden", "--json", file.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["file"], "cfm_unet_a.safetensors");
    assert_eq!((line["check"].as_str(), line["ok"].as_bool(), line["tolerance"].as_f64()), (Some("forward"), Some(true), Some(1e-4)));
    assert!(line["rel_err"].as_f64().unwrap() <= 1e-4);
    assert_eq!((line["device"].as_str(), line["dtype"].as_str()), (Some("cpu"), Some("f32")));

    let missing = golden.join("no-such-file.safetensors");
    let output = fmboost().args(["check-golden", "--json", missing.to_str().unwrap()]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).lines().next().unwrap()).unwrap();
    assert_eq!((line["ok"].as_bool(), line["check"].is_null()), (Some(false), true));
    assert!(line["error"].as_str().unwrap().contains("no-such-file.safetensors"), "{line}");
}

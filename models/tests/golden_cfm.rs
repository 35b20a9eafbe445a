//! Every `cfm_*` reference file in the shared golden directory must pass all its checks
//! (forward ≤ 1e-4, sampler loops ≤ 1e-3 relative error, f32 on the CPU).

use std::path::PathBuf;

use fmboost_models::golden::{check_file, RunOptions};

fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("FMBOOST_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/golden")));
    dir.canonicalize()
        .unwrap_or_else(|e| panic!("golden directory {} is missing ({e}); set FMBOOST_GOLDEN_DIR", dir.display()))
}

fn cfm_files(prefix: &str) -> Vec<PathBuf> {
    let dir = golden_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {prefix}*.safetensors in {}", dir.display());
    files
}

fn run_all(prefix: &str, tolerance: f64) {
    let mut failures = Vec::new();
    for path in cfm_files(prefix) {
        let checks = check_file(&path, &RunOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!checks.is_empty(), "{}: no checks ran", path.display());
        for check in checks {
            assert!(check.tolerance <= tolerance, "{}: tolerance {} looser than {tolerance}", check.name, check.tolerance);
            println!("{} {} rel_err={:.3e}", path.display(), check.name, check.rel_err);
            if !check.ok() {
                failures.push(format!("{} {} rel_err={:.3e}", path.display(), check.name, check.rel_err));
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:#?}");
}

#[test]
fn unet_files_match_the_reference_forward() {
    run_all("cfm_unet_", 1e-4);
}

#[test]
fn sampler_files_match_the_reference_loops() {
    let files = cfm_files("cfm_sampler_");
    let checks = check_file(&files[0], &RunOptions::default()).unwrap();
    let names: Vec<_> = checks.iter().map(|c| c.name.as_str()).collect();
    for want in ["alpha_bar", "bilinear.z_up", "nearest.z_up", "source.x0"] {
        assert!(names.contains(&want), "missing check {want} in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("ode.")), "{names:?}");
    run_all("cfm_sampler_", 1e-3);
}

//! Every Stable Diffusion / first-stage golden file passes its checks (the same code as
//! `fmboost check-golden`), within the README's tolerances.

mod sd_support;

use fmboost_models::golden::{check_file, RunOptions};

fn run(name: &str) {
    let path = sd_support::golden_dir().join(name);
    let checks = check_file(&path, &RunOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!checks.is_empty(), "{name}: no checks ran");
    for c in &checks {
        println!("{name}: {} rel_err {:.3e} (tolerance {:.0e})", c.name, c.rel_err, c.tolerance);
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok()).map(|c| format!("{} {:.3e} > {:.0e}", c.name, c.rel_err, c.tolerance)).collect();
    assert!(failed.is_empty(), "{name}: {failed:?}");
}

#[test]
fn sd_vae_tiny() {
    run("sd_vae_tiny.safetensors");
}

#[test]
fn clip_text_tiny() {
    run("clip_text_tiny.safetensors");
}

#[test]
fn sd_unet_tiny() {
    run("sd_unet_tiny.safetensors");
}

#[test]
fn sd_loops_tiny() {
    run("sd_loops_tiny.safetensors");
}

#[test]
fn ldm_autoencoder_tiny() {
    run("ldm_autoencoder_tiny.safetensors");
}

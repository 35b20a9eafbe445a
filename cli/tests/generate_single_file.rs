//! `fmboost generate --profile P.toml --prompt …` on a single-file SD checkpoint (UNet, text
//! encoder and VAE from the one file) gives the latent and the PNG of the diffusers directory
//! it was made from; a profile pointing at a broken file is an error naming it.

#[path = "../../models/tests/single_file_support/mod.rs"]
mod single_file_support;

use std::path::Path;
use std::process::{Command, Output};

use single_file_support as support;

fn generate(profile: &Path, out_dir: &Path, tag: &str) -> Output {
    let out = out_dir.join(format!("{tag}.png"));
    let latent = out_dir.join(format!("{tag}.pb"));
    Command::new(env!("CARGO_BIN_EXE_fmboost"))
        .args(["generate", "--profile", profile.to_str().unwrap(), "--prompt", "a photo of a cat", "--seed", "7"])
        .args(["--width", "64", "--height", "64", "--steps", "3", "--hops", "0"])
        .args(["--out", out.to_str().unwrap(), "--latent-out", latent.to_str().unwrap()])
        .output()
        .expect("running fmboost generate")
}

fn write_profile(path: &Path, base: &str, autoencoder: &str) {
    // No hops: `[defaults] hops = 0`, and the capabilities of an SD base without them.
    let tables = "[defaults]\nhops = 0\n[capabilities]\ntext_conditioning = true\nschedulers = [\"ddim\", \"euler_a\", \"lcm\"]\n\
                  hops = 0\nlatent_channels = 4\nlatent_multiple = 1\n";
    std::fs::write(path, format!("name = \"sd15-tiny\"\n[base]\nkind = \"stable-diffusion\"\n{base}\n[autoencoder]\n{autoencoder}\n{tables}")).unwrap();
}

#[test]
fn single_file_profile_generates_what_its_directory_does() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("sd15-tiny.safetensors");
    support::write_single_file(&single);

    let single_profile = dir.path().join("single.toml");
    let base = format!(
        "path = \"sd15-tiny.safetensors\"\nconfig = \"{}\"\ntokenizer = \"{}\"",
        support::fixture().display(),
        support::tokenizer_dir().display()
    );
    write_profile(&single_profile, &base, "kind = \"ldm\"\npath = \"sd15-tiny.safetensors\"");
    let dir_profile = dir.path().join("dir.toml");
    let fixture = support::fixture();
    let (sd_dir, vae_dir) = (fixture.display(), fixture.join("vae"));
    write_profile(&dir_profile, &format!("path = \"{sd_dir}\""), &format!("kind = \"diffusers\"\npath = \"{}\"", vae_dir.display()));

    for (profile, tag) in [(&single_profile, "single"), (&dir_profile, "dir")] {
        let output = generate(profile, dir.path(), tag);
        assert!(output.status.success(), "{tag}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    assert_eq!(read("single.pb"), read("dir.pb"), "the final latents differ");
    assert_eq!(read("single.png"), read("dir.png"), "the PNGs differ");
}

#[test]
fn a_broken_single_file_is_an_error_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = support::single_file_tensors();
    tensors.remove("model.diffusion_model.out.2.bias").unwrap();
    let single = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&tensors, &single).unwrap();
    let profile = dir.path().join("p.toml");
    let base = format!("path = \"broken.safetensors\"\nconfig = \"{}\"", support::fixture().display());
    write_profile(&profile, &base, "kind = \"ldm\"\npath = \"broken.safetensors\"");
    let output = generate(&profile, dir.path(), "x");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.safetensors") && stderr.contains("conv_out.bias"), "{stderr}");
    assert!(!dir.path().join("x.png").exists(), "nothing written on failure");
}

//! The `fmboost` binary on SD directories as users download them (../shared/fixtures,
//! unchanged): `tokenize --json` gives the reference ids of ../shared/golden/clip_tokens.json,
//! `generate --profile P.toml --prompt …` works on both layouts, and a broken copy fails with
//! the file and the key named.

#[path = "../../engine/tests/support/sd_profile.rs"]
mod sd_profile;

use std::path::Path;
use std::process::{Command, Output};

use sd_profile::Fixture;

fn fmboost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fmboost")).args(args).output().expect("running fmboost")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn tokenize_json_equals_the_reference_ids_on_both_layouts() {
    let text = std::fs::read_to_string(sd_profile::shared_dir().join("golden/clip_tokens.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    let prompts: Vec<&str> = cases.iter().map(|c| c["prompt"].as_str().unwrap()).collect();
    for fixture in [Fixture::F32, Fixture::Fp16] {
        let dir = fixture.dir();
        let mut args = vec!["tokenize", "--model", dir.to_str().unwrap(), "--json"];
        args.extend(&prompts);
        let output = fmboost(&args);
        assert!(output.status.success(), "{fixture:?}: {}", stderr(&output));
        let stdout = String::from_utf8(output.stdout.clone()).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), cases.len(), "{fixture:?}: one line per prompt");
        for (line, case) in lines.iter().zip(cases) {
            let ids: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(ids, case["ids"], "{fixture:?}: prompt {:?}", case["prompt"]);
        }
    }
}

#[test]
fn tokenize_lists_the_pieces_without_json_and_names_bad_input() {
    let dir = Fixture::F32.dir();
    let output = fmboost(&["tokenize", "--model", dir.to_str().unwrap(), "A cat!"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    assert_eq!(
        stdout,
        "prompt 1: \"A cat!\": 5 tokens, 72 padding, 0 truncated\n49406\t<|startoftext|>\n320\ta</w>\n2368\tcat</w>\n256\t!</w>\n49407\t<|endoftext|>\n"
    );
    let long = "red ".repeat(100);
    let output = fmboost(&["tokenize", "--model", dir.to_str().unwrap(), "--json", &long]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("prompt 1: longer than 77 tokens, 25 dropped"), "{}", stderr(&output));
    let output = fmboost(&["tokenize", "--model", "/nonexistent/sd", "x"]);
    assert!(!output.status.success() && stderr(&output).contains("--model /nonexistent/sd"), "{}", stderr(&output));
    let empty = tempfile::tempdir().unwrap();
    let output = fmboost(&["tokenize", "--model", empty.path().to_str().unwrap(), "x"]);
    assert!(!output.status.success() && stderr(&output).contains("tokenizer.json (or vocab.json + merges.txt)"), "{}", stderr(&output));
    let output = fmboost(&["tokenize", "--model", dir.to_str().unwrap()]);
    assert!(!output.status.success() && stderr(&output).contains("PROMPT"), "{}", stderr(&output));
}

fn generate(profile: &Path, out: &Path) -> Output {
    fmboost(&["generate", "--profile", profile.to_str().unwrap(), "--prompt", "a photo of a cat", "--seed", "3", "--out", out.to_str().unwrap()])
}

#[test]
fn generate_works_on_both_fixture_directories_unchanged() {
    for fixture in [Fixture::F32, Fixture::Fp16] {
        let dir = tempfile::tempdir().unwrap();
        let profile = sd_profile::write_profile(dir.path(), fixture);
        let out = dir.path().join("cat.png");
        let output = generate(&profile, &out);
        assert!(output.status.success(), "{fixture:?}: {}", stderr(&output));
        let image = image::open(&out).unwrap();
        assert_eq!((image.width(), image.height()), (128, 128), "{fixture:?}: 64 px base, one hop");
    }
}

#[test]
fn generate_on_a_broken_copy_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sd");
    let src = Fixture::F32.dir();
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(model.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), model.join(sub).join(entry.file_name())).unwrap();
        }
    }
    // Rename one tensor of the text encoder: its key goes missing.
    let weights = model.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let needle = b"final_layer_norm.weight";
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the key is in the header");
    let mut broken = bytes.clone();
    broken[at..at + needle.len()].copy_from_slice(b"final_layer_norm.wEIGHT");
    std::fs::write(&weights, broken).unwrap();
    let profile = sd_profile::write_profile_for(dir.path(), Fixture::F32, &model);
    let output = generate(&profile, &dir.path().join("x.png"));
    let err = stderr(&output);
    assert!(!output.status.success(), "a broken directory must fail");
    assert!(err.contains("text_encoder/model.safetensors") && err.contains("missing key `final_layer_norm.weight`"), "{err}");

    // The fp16 directory without `variant`: the error says which setting loads it.
    let profile = sd_profile::write_profile(dir.path(), Fixture::Fp16);
    let text = std::fs::read_to_string(&profile).unwrap().replace("variant = \"fp16\"\n", "");
    std::fs::write(&profile, text).unwrap();
    let output = generate(&profile, &dir.path().join("x.png"));
    let err = stderr(&output);
    assert!(!output.status.success() && err.contains("set variant = \"fp16\""), "{err}");
}

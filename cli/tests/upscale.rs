//! `fmboost upscale` on awkward inputs: sizes that are not multiples of 8, grayscale and RGBA
//! PNGs work (padded, converted, cropped back); a corrupt file is a clear error naming it.

use std::path::Path;
use std::process::{Command, Output};

fn upscale(input: &Path, out: &Path, scale: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fmboost"))
        .args(["upscale", input.to_str().unwrap(), "--scale", scale, "--out", out.to_str().unwrap(), "--cfm-steps", "2"])
        .output()
        .expect("running fmboost upscale")
}

fn size_of(path: &Path) -> (u32, u32) {
    let image = image::open(path).expect("a readable PNG");
    (image.width(), image.height())
}

#[test]
fn grayscale_of_odd_size_is_upscaled_4x_to_the_exact_size() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("gray.png");
    image::GrayImage::from_fn(30, 21, |x, y| image::Luma([(x * 8 + y * 3) as u8])).save(&input).unwrap();
    let out = dir.path().join("out.png");
    let output = upscale(&input, &out, "4");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(size_of(&out), (120, 84));
}

#[test]
fn rgba_is_upscaled_2x() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rgba.png");
    image::RgbaImage::from_fn(17, 9, |x, y| image::Rgba([x as u8 * 10, y as u8 * 20, 90, 128])).save(&input).unwrap();
    let out = dir.path().join("out.png");
    let output = upscale(&input, &out, "2");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(size_of(&out), (34, 18));
}

#[test]
fn corrupt_files_and_bad_scales_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("broken.png");
    std::fs::write(&input, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let out = dir.path().join("out.png");
    let output = upscale(&input, &out, "4");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.png") && stderr.contains("not a readable PNG or JPEG"), "{stderr}");
    assert!(!out.exists(), "nothing written on failure");

    let output = upscale(&input, &out, "3");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--scale 3"));

    let output = upscale(&dir.path().join("missing.png"), &out, "2");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.png"));
}

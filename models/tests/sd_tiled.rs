//! Tiled decoding of the golden VAE's big latent against its untiled reference: the mean error
//! stays small and no tile border shows (no row or column along a border is worse than 3× the
//! image's mean error).

mod sd_support;

use candle_core::{DType, Tensor};
use fmboost_models::autoencoder::TileConfig;
use fmboost_models::golden::sd::{golden_tiles, mean_abs_err, vae_from, TILED_MAE_TOLERANCE};
use fmboost_models::golden::RunOptions;
use fmboost_models::progress;

/// Mean |ours − reference| of one pixel row (`axis` 2) or column (`axis` 3), over batch and channels.
fn line_error(diff: &Tensor, axis: usize, index: usize) -> f64 {
    diff.narrow(axis, index, 1).unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Pixel positions of every tile edge inside the image, along a side of `len` latent pixels.
fn border_lines(tiles: &TileConfig, len: usize, factor: usize) -> Vec<usize> {
    let mut lines = Vec::new();
    for origin in tiles.origins(len) {
        let end = (origin + tiles.tile).min(len);
        if origin > 0 {
            lines.extend([origin * factor, origin * factor + 1]);
        }
        if end < len {
            lines.extend([end * factor - 2, end * factor - 1]);
        }
    }
    lines
}

/// (mean abs error, worst border-line error / mean error).
fn report(tiles: &TileConfig) -> (f64, f64) {
    let file = sd_support::golden("sd_vae_tiny.safetensors");
    let ae = vae_from(&file, &RunOptions::default()).unwrap();
    let z = file.tensor("input.z_big").unwrap();
    let reference = file.tensor("output.decoded_big").unwrap();
    let scaled = (z * ae.config().scaling_factor).unwrap();
    let tiled = ae.decode_tiled(&scaled, tiles, &mut progress::ignore).unwrap();
    assert_eq!(tiled.dims(), reference.dims());
    let mae = mean_abs_err(&tiled, reference).unwrap();
    let diff = (tiled.to_dtype(DType::F64).unwrap() - reference.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap();
    let (_, _, h, w) = z.dims4().unwrap();
    let f = ae.config().downscale();
    let rows = border_lines(tiles, h, f).into_iter().map(|y| line_error(&diff, 2, y));
    let cols = border_lines(tiles, w, f).into_iter().map(|x| line_error(&diff, 3, x));
    let worst = rows.chain(cols).fold(0.0, f64::max);
    (mae, worst / mae)
}

#[test]
fn tiled_decode_matches_untiled_without_seams() {
    let file = sd_support::golden("sd_vae_tiny.safetensors");
    let (_, _, h, w) = file.tensor("input.z_big").unwrap().dims4().unwrap();
    let tiles = golden_tiles(h, w);
    assert!(tiles.origins(h).len() > 1 && tiles.origins(w).len() > 1, "the check must cross tile borders both ways");
    let (mae, ratio) = report(&tiles);
    assert!(mae <= TILED_MAE_TOLERANCE, "mean abs error {mae:.4e} > {TILED_MAE_TOLERANCE}");
    assert!(ratio <= 3.0, "a border row/column has {ratio:.2}x the image's mean error");
}

#[test]
fn border_lines_sit_on_tile_edges() {
    let tiles = TileConfig { tile: 4, overlap: 2, auto_above: 0 };
    // origins 0, 2, 4 on a side of 8: inner edges at latent 2, 4 (starts) and 4, 6 (ends).
    assert_eq!(border_lines(&tiles, 8, 1), vec![2, 3, 2, 3, 4, 5, 4, 5]);
}

//! Device and dtype selection from user-facing strings (`cpu`, `cuda`, `cuda:N`; `f32`, `f16`, `bf16`).
//!
//! Callers prefix the flag (`--device: ...`), so every message here names the value and what
//! was missing: a build without the `cuda` feature, or a CUDA build that finds no usable GPU.

use candle_core::{DType, Device};

/// Parses `cpu`, `cuda` or `cuda:N` and opens the device. CUDA needs the `cuda` cargo feature
/// and, at run time, the NVIDIA driver and a GPU with that ordinal.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if spec == "cuda" {
        Some(0)
    } else {
        spec.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok())
    };
    match ordinal {
        Some(n) => open_cuda(spec, n),
        None => Err(format!("`{spec}`: expected `cpu`, `cuda` or `cuda:N`")),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device, String> {
    Err(format!("`{spec}`: this binary was built without CUDA (rebuild with `--features cuda`; see docs/benchmarks.md, GPU check)"))
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device, String> {
    // cudarc reports a missing driver library or symbol by panicking; a user who asked for a
    // GPU on a machine without one gets one line instead of a backtrace.
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal)).map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the CUDA driver could not be loaded");
        format!("`{spec}`: no usable CUDA device: {what} (is the NVIDIA driver installed and a GPU visible?)")
    })?;
    opened.map_err(|e| format!("`{spec}`: no usable CUDA device: {e} (is the NVIDIA driver installed and a GPU visible?)"))
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType, String> {
    match spec.trim() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("`{other}`: expected `f32`, `f16` or `bf16`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let err = parse_device("tpu").unwrap_err();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        let err = parse_device("cuda:x").unwrap_err();
        assert!(err.contains("`cuda:x`") && err.contains("expected"), "{err}");
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64").unwrap_err().contains("f64"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_on_a_cpu_build_says_it_was_built_without_cuda() {
        for spec in ["cuda", "cuda:0", "cuda:3"] {
            let err = parse_device(spec).unwrap_err();
            assert!(err.contains(&format!("`{spec}`")) && err.contains("built without CUDA") && err.contains("--features cuda"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}

//! Device and dtype selection from user-facing strings (`cpu`, `cuda`, `cuda:N`; `f32`, `f16`, `bf16`).

use candle_core::{DType, Device};

/// Parses `cpu`, `cuda` or `cuda:N`. CUDA needs the `cuda` cargo feature.
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
        Some(n) => Device::new_cuda(n).map_err(|e| {
            format!("device `{spec}`: {e} (CUDA needs a build with `--features cuda`)")
        }),
        None => Err(format!("device `{spec}`: expected `cpu`, `cuda` or `cuda:N`")),
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(spec: &str) -> Result<DType, String> {
    match spec.trim() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("dtype `{other}`: expected `f32`, `f16` or `bf16`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let err = parse_device("tpu").unwrap_err();
        assert!(err.contains("tpu"), "{err}");
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64").unwrap_err().contains("f64"));
    }
}

//! Tensors on the wire: dtype, shape, little-endian bytes and a CRC32C of the bytes.
//!
//! One encoding serves gRPC uploads/downloads and the blobs between stages in Redis (the
//! prost-encoded `fmboost.v1.Tensor`). A checksum mismatch, a size that does not match the
//! shape, or a non-finite value is an error, never a wrong image.

use fmboost_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    U8,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        match pb::DType::try_from(value).ok()? {
            pb::DType::DtypeF32 => Some(DType::F32),
            pb::DType::DtypeF16 => Some(DType::F16),
            pb::DType::DtypeBf16 => Some(DType::BF16),
            pb::DType::DtypeU8 => Some(DType::U8),
            pb::DType::DtypeUnspecified => None,
        }
    }

    fn to_proto(self) -> pb::DType {
        match self {
            DType::F32 => pb::DType::DtypeF32,
            DType::F16 => pb::DType::DtypeF16,
            DType::BF16 => pb::DType::DtypeBf16,
            DType::U8 => pb::DType::DtypeU8,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("unknown dtype {0}")]
    UnknownDType(i32),
    #[error("shape {shape:?} needs {expected} bytes of {dtype:?}, got {actual}")]
    SizeMismatch { shape: Vec<usize>, dtype: DType, expected: usize, actual: usize },
    #[error("checksum mismatch: header says {expected:#010x}, data has {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("non-finite value (NaN or infinity) at element {index}")]
    NonFinite { index: usize },
    #[error("shape {0:?} is too large")]
    ShapeOverflow(Vec<u64>),
}

/// A checked tensor: the size matches the shape and the checksum matched on decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Row-major, little-endian elements.
    pub data: Vec<u8>,
}

impl WireTensor {
    /// A tensor of f32 values; panics when `values.len()` does not match the shape (a
    /// programming error, not input).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "shape {shape:?} vs {} values", values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        WireTensor { dtype: DType::F32, shape, data }
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32 (converting f16/bf16/u8).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => self.data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            DType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            DType::U8 => self.data.iter().map(|&b| b as f32).collect(),
        }
    }

    pub fn checksum(&self) -> u32 {
        crc32c::crc32c(&self.data)
    }

    /// Decodes and checks a wire tensor: known dtype, size matching the shape, checksum, and
    /// only finite values.
    pub fn from_proto(tensor: pb::Tensor) -> Result<Self, TensorError> {
        let dtype = DType::from_proto(tensor.dtype).ok_or(TensorError::UnknownDType(tensor.dtype))?;
        let mut shape = Vec::with_capacity(tensor.shape.len());
        let mut elems: usize = 1;
        for &dim in &tensor.shape {
            let dim = usize::try_from(dim).map_err(|_| TensorError::ShapeOverflow(tensor.shape.clone()))?;
            elems = elems.checked_mul(dim).ok_or_else(|| TensorError::ShapeOverflow(tensor.shape.clone()))?;
            shape.push(dim);
        }
        let expected = elems.checked_mul(dtype.size_in_bytes()).ok_or_else(|| TensorError::ShapeOverflow(tensor.shape.clone()))?;
        if expected != tensor.data.len() {
            return Err(TensorError::SizeMismatch { shape, dtype, expected, actual: tensor.data.len() });
        }
        let actual = crc32c::crc32c(&tensor.data);
        if actual != tensor.crc32c {
            return Err(TensorError::Checksum { expected: tensor.crc32c, actual });
        }
        let checked = WireTensor { dtype, shape, data: tensor.data };
        if dtype != DType::U8 {
            if let Some(index) = checked.to_f32().iter().position(|v| !v.is_finite()) {
                return Err(TensorError::NonFinite { index });
            }
        }
        Ok(checked)
    }

    pub fn to_proto(&self) -> pb::Tensor {
        pb::Tensor {
            dtype: self.dtype.to_proto() as i32,
            shape: self.shape.iter().map(|&d| d as u64).collect(),
            data: self.data.clone(),
            crc32c: self.checksum(),
        }
    }
}

/// IEEE 754 half → single precision (exact; f16 is a subset of f32).
fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let mant = (bits & 0x3ff) as u32;
    let value = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise the mantissa.
            let shift = mant.leading_zeros() - 21;
            let mant = (mant << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (mant << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000,
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WireTensor {
        WireTensor::from_f32(vec![1, 2, 2], &[0.5, -1.0, 2.0, 3.25])
    }

    #[test]
    fn round_trips_through_proto() {
        let tensor = sample();
        let back = WireTensor::from_proto(tensor.to_proto()).unwrap();
        assert_eq!(back, tensor);
        assert_eq!(back.to_f32(), vec![0.5, -1.0, 2.0, 3.25]);
    }

    #[test]
    fn rejects_bad_checksum() {
        let mut proto = sample().to_proto();
        proto.crc32c ^= 1;
        assert!(matches!(WireTensor::from_proto(proto), Err(TensorError::Checksum { .. })));
    }

    #[test]
    fn rejects_size_mismatch_and_unknown_dtype() {
        let mut proto = sample().to_proto();
        proto.shape = vec![1, 2, 3];
        assert!(matches!(WireTensor::from_proto(proto), Err(TensorError::SizeMismatch { expected: 24, actual: 16, .. })));
        let mut proto = sample().to_proto();
        proto.dtype = 0;
        assert_eq!(WireTensor::from_proto(proto), Err(TensorError::UnknownDType(0)));
    }

    #[test]
    fn rejects_nan_with_valid_checksum() {
        let tensor = WireTensor::from_f32(vec![3], &[1.0, f32::NAN, 0.0]);
        assert_eq!(WireTensor::from_proto(tensor.to_proto()), Err(TensorError::NonFinite { index: 1 }));
    }

    #[test]
    fn rejects_overflowing_shape() {
        let proto = pb::Tensor { dtype: pb::DType::DtypeF32 as i32, shape: vec![u64::MAX, 2], data: vec![], crc32c: 0 };
        assert!(matches!(WireTensor::from_proto(proto), Err(TensorError::ShapeOverflow(_))));
    }

    #[test]
    fn converts_half_precision() {
        let data: Vec<u8> = [0x3c00u16, 0xc000, 0x0001, 0x7bff].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = WireTensor { dtype: DType::F16, shape: vec![4], data };
        assert_eq!(tensor.to_f32(), vec![1.0, -2.0, 5.960_464_5e-8, 65504.0]);
        let bf: Vec<u8> = [0x3f80u16, 0xc040].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = WireTensor { dtype: DType::BF16, shape: vec![2], data: bf };
        assert_eq!(tensor.to_f32(), vec![1.0, -3.0]);
    }
}

//! GetResult: streams the PNG (and the final latent) out of their blobs in ranges (the blob
//! store's `get_range`: GETRANGE in Redis),
//! so a call holds about one chunk in memory whatever the result's size or `chunk_bytes`.
//!
//! A blob is a prost-encoded `BlobPayload`: `latent = 1` (a `Tensor`) or `image = 2` (bytes).
//! Only the few header bytes before and after the payload are read and parsed here; the
//! payload itself goes out as it is stored. The latent's CRC32C travels in every chunk, for
//! the client to check the whole.

use std::pin::Pin;

use fmboost_core::spec::ValidationError;
use fmboost_core::tensor::DType;
use fmboost_proto::v1 as pb;
use futures::Stream;
use tonic::Status;

use crate::error::ApiError;
use crate::redis_guard::RedisGuard;
use crate::store::{JobState, JobStore};

/// `chunk_bytes = 0` gets this.
pub const DEFAULT_CHUNK: usize = 1 << 20;
/// Smallest chunk: HTTP/2's default frame size; smaller chunks only add per-message cost.
pub const MIN_CHUNK: usize = 16 << 10;
/// Largest chunk (the service's encoding limit allows for it).
pub const MAX_CHUNK: usize = 4 << 20;

/// The chunk size a request asks for; INVALID_ARGUMENT outside MIN_CHUNK..=MAX_CHUNK.
pub fn chunk_size(requested: u32) -> Result<usize, ApiError> {
    match requested as usize {
        0 => Ok(DEFAULT_CHUNK),
        n if (MIN_CHUNK..=MAX_CHUNK).contains(&n) => Ok(n),
        n => Err(ApiError::Invalid(ValidationError {
            field: "chunk_bytes".into(),
            message: format!("must be 0 (the default, {DEFAULT_CHUNK}) or in {MIN_CHUNK}..={MAX_CHUNK}, got {n}"),
        })),
    }
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ResultChunk, Status>> + Send + 'static>>;

/// A byte range of a blob to stream, and how to label its chunks.
struct Part {
    blob: String,
    offset: u64,
    len: u64,
    latent: Option<LatentHeader>,
}

#[derive(Debug, Clone, PartialEq)]
struct LatentHeader {
    dtype: i32,
    shape: Vec<u64>,
    crc32c: u32,
}

/// Checks the job and locates its result; the returned stream reads one chunk per message.
pub async fn result_stream(store: &JobStore, guard: &RedisGuard, request: pb::GetResultRequest) -> Result<ChunkStream, ApiError> {
    crate::error::check_job_id(&request.job_id)?;
    let chunk = chunk_size(request.chunk_bytes)? as u64;
    let job_id = request.job_id;
    let mut parts = Vec::new();
    let record = guard.bounded(store.get(&job_id)).await?.ok_or_else(|| ApiError::NotFound(job_id.clone()))?;
    if record.state != JobState::Completed {
        return Err(ApiError::NotCompleted { job_id, state: record.state.name().into() });
    }
    let reader = BlobReader { store: store.clone(), guard: guard.clone() };
    match guard.bounded(reader.locate(&record.png_blob)).await? {
        Some(Payload::Image { offset, len }) => parts.push(Part { blob: record.png_blob.clone(), offset, len, latent: None }),
        Some(Payload::Latent { .. }) => return Err(internal(format!("result blob {} is not an image", record.png_blob))),
        None => return Err(ApiError::ResultExpired(job_id)),
    }
    if request.include_latent {
        match guard.bounded(reader.locate(&record.latent_blob)).await? {
            Some(Payload::Latent { header, offset, len }) => {
                check_latent_size(&header, len).map_err(|e| internal(format!("latent blob {}: {e}", record.latent_blob)))?;
                parts.push(Part { blob: record.latent_blob.clone(), offset, len, latent: Some(header) });
            }
            Some(Payload::Image { .. }) => return Err(internal(format!("latent blob {} is not a tensor", record.latent_blob))),
            None => return Err(ApiError::ResultExpired(job_id)),
        }
    }
    let state = (reader, parts, 0usize, 0u64, job_id);
    let chunks = futures::stream::try_unfold(state, move |(reader, parts, index, sent, job_id)| async move {
        let Some(part) = parts.get(index) else { return Ok(None) };
        let len = chunk.min(part.len - sent);
        let data = reader.guard.bounded(reader.range(&part.blob, part.offset + sent, len)).await.map_err(Status::from)?;
        if data.len() as u64 != len {
            return Err(Status::from(ApiError::ResultExpired(job_id)));
        }
        let message = match &part.latent {
            None => pb::result_chunk::Part::Png(pb::PngChunk { offset: sent, total_bytes: part.len, data }),
            Some(h) => pb::result_chunk::Part::Latent(pb::LatentChunk {
                dtype: h.dtype,
                shape: h.shape.clone(),
                crc32c: h.crc32c,
                offset: sent,
                total_bytes: part.len,
                data,
            }),
        };
        let (index, sent) = if sent + len >= part.len { (index + 1, 0) } else { (index, sent + len) };
        Ok(Some((pb::ResultChunk { part: Some(message) }, (reader, parts, index, sent, job_id))))
    });
    Ok(Box::pin(chunks))
}

fn internal(message: String) -> ApiError {
    ApiError::Internal(anyhow::anyhow!(message))
}

fn check_latent_size(header: &LatentHeader, len: u64) -> Result<(), String> {
    let dtype = DType::from_proto(header.dtype).ok_or_else(|| format!("unknown dtype {}", header.dtype))?;
    let elements = header.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).ok_or("shape overflows")?;
    if elements.checked_mul(dtype.size_in_bytes() as u64) != Some(len) {
        return Err(format!("shape {:?} of {dtype:?} does not match {len} data bytes", header.shape));
    }
    Ok(())
}

/// Where a blob's payload lies.
#[derive(Debug, PartialEq)]
enum Payload {
    Image { offset: u64, len: u64 },
    Latent { header: LatentHeader, offset: u64, len: u64 },
}

/// Longest field header (key and length varints) and varint field.
const FIELD_WINDOW: u64 = 20;
/// Longest packed `shape` read.
const MAX_SHAPE_BYTES: u64 = 1024;

#[derive(Clone)]
struct BlobReader {
    store: JobStore,
    guard: RedisGuard,
}

impl BlobReader {
    async fn range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, ApiError> {
        Ok(self.store.blobs.get_range(key, offset, len).await?)
    }

    /// The payload's place in blob `key`; None when the key is empty or gone.
    async fn locate(&self, key: &str) -> Result<Option<Payload>, ApiError> {
        if key.is_empty() {
            return Ok(None);
        }
        let Some(total) = self.store.blobs.len(key).await? else { return Ok(None) };
        let bad = |e: String| internal(format!("blob {key}: {e}"));
        let mut cursor = 0;
        while cursor < total {
            let field = self.field(key, cursor, total).await.map_err(bad)?;
            match (field.number, field.value) {
                (2, Value::Bytes { offset, len }) => return Ok(Some(Payload::Image { offset, len })),
                (1, Value::Bytes { offset, len }) => return self.tensor(key, offset, offset + len).await.map_err(bad).map(Some),
                _ => {}
            }
            cursor = field.end;
        }
        Err(bad("no payload".into()))
    }

    /// Parses the `Tensor` message in `start..end` of the blob, without reading its data.
    async fn tensor(&self, key: &str, start: u64, end: u64) -> Result<Payload, String> {
        let mut header = LatentHeader { dtype: 0, shape: Vec::new(), crc32c: 0 };
        let mut data = None;
        let mut cursor = start;
        while cursor < end {
            let field = self.field(key, cursor, end).await?;
            match (field.number, field.value) {
                (1, Value::Varint(v)) => header.dtype = v as i32,
                (2, Value::Varint(v)) => header.shape.push(v),
                (2, Value::Bytes { offset, len }) => {
                    if len > MAX_SHAPE_BYTES {
                        return Err(format!("a shape of {len} bytes"));
                    }
                    let bytes = self.range(key, offset, len).await.map_err(|e| e.to_string())?;
                    let mut rest = bytes.as_slice();
                    while !rest.is_empty() {
                        let (v, n) = varint(rest).ok_or("truncated shape")?;
                        header.shape.push(v);
                        rest = &rest[n..];
                    }
                }
                (3, Value::Bytes { offset, len }) => data = Some((offset, len)),
                (4, Value::Varint(v)) => header.crc32c = v as u32,
                _ => {}
            }
            cursor = field.end;
        }
        let (offset, len) = data.unwrap_or((start, 0));
        Ok(Payload::Latent { header, offset, len })
    }

    /// The field starting at `at` (its value read when a varint, located when bytes).
    async fn field(&self, key: &str, at: u64, end: u64) -> Result<Field, String> {
        let window = self.range(key, at, FIELD_WINDOW.min(end - at)).await.map_err(|e| e.to_string())?;
        parse_field(&window, at, end)
    }
}

#[derive(Debug, PartialEq)]
enum Value {
    Varint(u64),
    /// A length-delimited value's place in the blob.
    Bytes {
        offset: u64,
        len: u64,
    },
    Other,
}

#[derive(Debug, PartialEq)]
struct Field {
    number: u64,
    value: Value,
    /// Where the next field starts.
    end: u64,
}

/// Parses the protobuf field whose first bytes are `window`, found at offset `at` of a
/// message that ends at `end`.
fn parse_field(window: &[u8], at: u64, end: u64) -> Result<Field, String> {
    let (key, key_len) = varint(window).ok_or_else(|| format!("truncated field key at {at}"))?;
    let rest = &window[key_len..];
    let start = at + key_len as u64;
    let (value, next) = match key & 7 {
        0 => {
            let (v, n) = varint(rest).ok_or_else(|| format!("truncated varint at {start}"))?;
            (Value::Varint(v), start + n as u64)
        }
        1 => (Value::Other, start + 8),
        2 => {
            let (len, n) = varint(rest).ok_or_else(|| format!("truncated length at {start}"))?;
            let offset = start + n as u64;
            (Value::Bytes { offset, len }, offset.checked_add(len).ok_or("length overflows")?)
        }
        5 => (Value::Other, start + 4),
        wire => return Err(format!("unsupported wire type {wire} at {at}")),
    };
    if next > end {
        return Err(format!("field at {at} runs past the end ({next} > {end})"));
    }
    Ok(Field { number: key >> 3, value, end: next })
}

/// A base-128 varint at the start of `bytes`: its value and length.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmboost_proto::internal as ipb;
    use prost::Message;

    /// Walks an encoded blob the way `BlobReader::locate` does, on a byte slice.
    fn locate(blob: &[u8]) -> (u64, u64, Vec<(u64, Value)>) {
        let mut fields = Vec::new();
        let mut cursor = 0;
        let total = blob.len() as u64;
        while cursor < total {
            let window = &blob[cursor as usize..(cursor + FIELD_WINDOW).min(total) as usize];
            let field = parse_field(window, cursor, total).unwrap();
            cursor = field.end;
            fields.push((field.number, field.value));
        }
        match &fields[0] {
            (_, Value::Bytes { offset, len }) => (*offset, *len, fields),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finds_the_png_bytes_in_an_image_blob() {
        let png: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let blob = ipb::BlobPayload { payload: Some(ipb::blob_payload::Payload::Image(png.clone())) }.encode_to_vec();
        let (offset, len, fields) = locate(&blob);
        assert_eq!(fields.len(), 1);
        assert_eq!(&blob[offset as usize..(offset + len) as usize], png.as_slice());
    }

    #[test]
    fn finds_the_tensor_fields_in_a_latent_blob() {
        let tensor = fmboost_core::tensor::WireTensor::from_f32(vec![1, 4, 8, 8], &[0.25; 256]).to_proto();
        let blob = ipb::BlobPayload { payload: Some(ipb::blob_payload::Payload::Latent(tensor.clone())) }.encode_to_vec();
        let (start, len, _) = locate(&blob);
        let inner = &blob[start as usize..(start + len) as usize];
        let mut cursor = 0;
        let mut seen = Vec::new();
        while cursor < inner.len() as u64 {
            let field = parse_field(&inner[cursor as usize..], cursor, inner.len() as u64).unwrap();
            cursor = field.end;
            seen.push(field);
        }
        let data = seen.iter().find(|f| f.number == 3).unwrap();
        let Value::Bytes { offset, len } = data.value else { panic!() };
        assert_eq!(&inner[offset as usize..(offset + len) as usize], tensor.data.as_slice());
        assert!(seen.iter().any(|f| f.number == 4 && f.value == Value::Varint(u64::from(tensor.crc32c))));
        let header = LatentHeader { dtype: tensor.dtype, shape: tensor.shape.clone(), crc32c: tensor.crc32c };
        assert_eq!(check_latent_size(&header, len), Ok(()));
        assert!(check_latent_size(&header, len - 4).is_err());
    }

    #[test]
    fn rejects_truncated_and_overlong_fields() {
        assert!(parse_field(&[0x12, 0x80], 0, 10).is_err(), "truncated length");
        assert!(parse_field(&[0x12, 0x05], 0, 4).unwrap_err().contains("past the end"));
        assert_eq!(varint(&[0xac, 0x02]), Some((300, 2)));
    }

    #[test]
    fn chunk_bytes_is_bounded() {
        assert_eq!(chunk_size(0).unwrap(), DEFAULT_CHUNK);
        assert_eq!(chunk_size(MIN_CHUNK as u32).unwrap(), MIN_CHUNK);
        assert_eq!(chunk_size(MAX_CHUNK as u32).unwrap(), MAX_CHUNK);
        for bad in [1, MIN_CHUNK as u32 - 1, MAX_CHUNK as u32 + 1] {
            let err = chunk_size(bad).unwrap_err().to_string();
            assert!(err.starts_with("chunk_bytes: "), "{err}");
        }
    }
}

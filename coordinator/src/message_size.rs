//! One rule for oversized requests: RESOURCE_EXHAUSTED (gRPC's status-code guide: "a message
//! over the limit"), whether the upload inside a Submit is over `--max-upload-bytes` or the
//! whole message is over the transport's limit (the upload limit + 1 MiB for Pipeline,
//! tonic's 4 MiB default for health and reflection). tonic itself answers the latter with
//! OUT_OF_RANGE; [`remap_oversized`] rewrites that answer.

use fmboost_core::spec::Limits;
use fmboost_proto::v1 as pb;

use crate::error::ApiError;

/// Room for the rest of a Submit besides its upload.
pub const SPEC_HEADROOM: usize = 1 << 20;

/// The upload of a Submit, against `--max-upload-bytes`.
pub fn check_upload_size(spec: &pb::JobSpec, limits: &Limits) -> Result<(), ApiError> {
    let (field, size) = match &spec.source {
        Some(pb::job_spec::Source::Latent(tensor)) => ("source.latent", tensor.data.len()),
        Some(pb::job_spec::Source::Image(image)) => ("source.image.data", image.data.len()),
        Some(pb::job_spec::Source::Text(_)) | None => return Ok(()),
    };
    if size > limits.max_upload_bytes {
        return Err(ApiError::TooLarge { field: field.into(), size, limit: limits.max_upload_bytes, flag: "--max-upload-bytes" });
    }
    Ok(())
}

/// tonic's answer to a request message over its decoding limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Rewrites tonic's OUT_OF_RANGE for an oversized request into RESOURCE_EXHAUSTED. Such an
/// answer is trailers-only (the status is in the headers); every other response passes as is.
pub fn remap_oversized<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else { return response };
    if status.code() != tonic::Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
        return response;
    }
    let detail = status.message().trim_start_matches(TONIC_TOO_LARGE).trim_start_matches(':').trim();
    let remapped = tonic::Status::resource_exhausted(format!("request message too large: {detail}"));
    if let Err(err) = remapped.add_header(response.headers_mut()) {
        tracing::error!("rewriting an oversized-message status: {err}");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: tonic::Status) -> http::Response<()> {
        let mut response = http::Response::new(());
        status.add_header(response.headers_mut()).unwrap();
        response
    }

    fn status_of(response: &http::Response<()>) -> tonic::Status {
        tonic::Status::from_header_map(response.headers()).unwrap()
    }

    #[test]
    fn tonic_oversized_becomes_resource_exhausted() {
        let tonic = "Error, decoded message length too large: found 70000000 bytes, the limit is: 68157440 bytes";
        let remapped = status_of(&remap_oversized(response(tonic::Status::out_of_range(tonic))));
        assert_eq!(remapped.code(), tonic::Code::ResourceExhausted);
        assert_eq!(remapped.message(), "request message too large: found 70000000 bytes, the limit is: 68157440 bytes");
        // Anything else is left alone.
        let other = status_of(&remap_oversized(response(tonic::Status::out_of_range("offset past the end"))));
        assert_eq!(other.code(), tonic::Code::OutOfRange);
        assert!(tonic::Status::from_header_map(remap_oversized(http::Response::new(())).headers()).is_none());
    }
}

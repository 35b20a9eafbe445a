//! Typed API errors and their gRPC status codes.

use fmboost_core::spec::ValidationError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("queue full: {active} jobs admitted and unfinished (--max-queued {max})")]
    QueueFull { active: u64, max: u64 },
    #[error("idempotency_key {key:?} belongs to job {job_id}, submitted with another spec (differs: {differs}); use a new key for a new job")]
    IdempotencyConflict { key: String, job_id: String, differs: String },
    #[error("unknown job id {0:?}")]
    NotFound(String),
    #[error("job {job_id} is {state}; its result exists once it has completed")]
    NotCompleted { job_id: String, state: String },
    #[error("the result of job {0} has expired")]
    ResultExpired(String),
    /// A request or its upload over a size limit (gRPC's rule for oversized messages).
    #[error("{field}: {size} bytes exceed the limit of {limit} bytes ({flag})")]
    TooLarge { field: String, size: usize, limit: usize, flag: &'static str },
    /// Nothing was changed: safe to retry.
    #[error("Redis unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// A Submit whose write went to Redis without an answer in time: the job may or may not
    /// exist. Never UNAVAILABLE, which clients take as safe to retry.
    #[error(
        "outcome unknown: {reason}; job {job_id} may have been created. Retry with the same idempotency_key, \
         or GetJob {job_id} once Redis answers (NOT_FOUND then means it was not created)"
    )]
    OutcomeUnknown { job_id: String, reason: String },
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

/// Trailing metadata of an unknown-outcome Submit: the id the job has if it was created.
pub const JOB_ID_METADATA: &str = "fmboost-job-id";

impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal() {
            ApiError::Unavailable(err.into())
        } else {
            ApiError::Internal(err.into())
        }
    }
}

impl From<fmboost_core::blob::BlobError> for ApiError {
    fn from(err: fmboost_core::blob::BlobError) -> Self {
        use fmboost_core::blob::BlobError;
        match err {
            BlobError::Unavailable(err) => ApiError::Unavailable(err),
            BlobError::Failed(err) => ApiError::Internal(err),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        let message = err.to_string();
        match err {
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::QueueFull { .. } => Status::resource_exhausted(message),
            ApiError::NotFound(_) | ApiError::ResultExpired(_) => Status::not_found(message),
            ApiError::NotCompleted { .. } => Status::failed_precondition(message),
            ApiError::TooLarge { .. } => Status::resource_exhausted(message),
            ApiError::IdempotencyConflict { .. } => Status::already_exists(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::OutcomeUnknown { job_id, .. } => {
                tracing::warn!("submit answered DEADLINE_EXCEEDED: {message}");
                let mut status = Status::deadline_exceeded(message);
                if let Ok(value) = job_id.parse() {
                    status.metadata_mut().insert(JOB_ID_METADATA, value);
                }
                status
            }
            ApiError::Internal(_) => {
                tracing::error!("{message}");
                Status::internal(message)
            }
        }
    }
}

/// Checks a job id argument: present and of a plausible form (unknown ids are NOT_FOUND later).
pub fn check_job_id(job_id: &str) -> Result<(), ApiError> {
    let plausible = !job_id.is_empty() && job_id.len() <= 64 && job_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if plausible {
        Ok(())
    } else {
        Err(ApiError::Invalid(ValidationError { field: "job_id".into(), message: format!("{job_id:?} is not a job id") }))
    }
}

//! The `Pipeline` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use fmboost_core::now_unix_ms;
use fmboost_core::spec::{self, Limits, Upload};
use fmboost_core::tensor::WireTensor;
use fmboost_proto::internal as ipb;
use fmboost_proto::v1 as pb;
use fmboost_proto::v1::pipeline_server::Pipeline;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{check_job_id, ApiError};
use crate::metrics::CoordinatorMetrics;
use crate::state::publish;
use crate::status;
use crate::store::{JobState, JobStore, NewJob, Submitted, Transition};
use crate::watch::{self, WatchHub};

/// Default and largest GetResult chunk.
const DEFAULT_CHUNK: usize = 1 << 20;
pub const MAX_CHUNK: usize = 4 << 20;

pub struct PipelineService {
    pub store: JobStore,
    pub hub: WatchHub,
    pub limits: Arc<Limits>,
    pub max_queued: u64,
    pub metrics: CoordinatorMetrics,
}

type ResultStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl PipelineService {
    async fn submit_job(&self, spec: Option<pb::JobSpec>) -> Result<pb::SubmitResponse, ApiError> {
        let spec = spec.ok_or_else(|| spec::ValidationError { field: "spec".into(), message: "required".into() })?;
        let now = now_unix_ms();
        let (job, upload) = match spec::validate(spec, &self.limits, now) {
            Ok(valid) => valid,
            Err(err) => {
                self.metrics.submissions.with_label_values(&["rejected_invalid"]).inc();
                return Err(err.into());
            }
        };
        let upload = upload.map(|upload| {
            let payload = match upload {
                Upload::Latent(tensor) => ipb::blob_payload::Payload::Latent(tensor.to_proto()),
                Upload::Image(data) => ipb::blob_payload::Payload::Image(data),
            };
            ipb::BlobPayload { payload: Some(payload) }
        });
        let job_id = uuid::Uuid::new_v4().to_string();
        let new_job = NewJob { job_id: &job_id, spec: &job, upload, max_queued: self.max_queued };
        match self.store.submit(new_job, now).await? {
            Submitted::Created(job_id) => {
                self.metrics.submissions.with_label_values(&["admitted"]).inc();
                tracing::info!(job = %job_id, first = %job.first_stage(), "admitted");
                Ok(pb::SubmitResponse { job_id, created: true })
            }
            Submitted::Existing(job_id) => {
                self.metrics.submissions.with_label_values(&["duplicate"]).inc();
                Ok(pb::SubmitResponse { job_id, created: false })
            }
            Submitted::Conflict(job_id) => {
                self.metrics.submissions.with_label_values(&["rejected_idempotency_conflict"]).inc();
                Err(self.idempotency_conflict(&job, job_id).await)
            }
            Submitted::Full { active } => {
                self.metrics.submissions.with_label_values(&["rejected_full"]).inc();
                Err(ApiError::QueueFull { active, max: self.max_queued })
            }
        }
    }

    /// ALREADY_EXISTS for a key reused with another spec, saying what differs when the first
    /// job's record is still there.
    async fn idempotency_conflict(&self, job: &spec::JobSpec, job_id: String) -> ApiError {
        let differs = match self.store.get(&job_id).await {
            Ok(Some(record)) => crate::idempotency::differences(&record.spec, job).join(", "),
            _ => "unknown, the job's record has expired".into(),
        };
        let key = job.idempotency_key.clone().unwrap_or_default();
        ApiError::IdempotencyConflict { key, job_id, differs }
    }

    async fn job_info(&self, job_id: &str) -> Result<pb::JobInfo, ApiError> {
        check_job_id(job_id)?;
        let record = self.store.get(job_id).await?.ok_or_else(|| ApiError::NotFound(job_id.to_string()))?;
        Ok(pb::JobInfo {
            job_id: record.job_id.clone(),
            state: record.state.to_proto() as i32,
            at: (!record.state.is_terminal()).then(|| record.at.to_proto()),
            spec: Some(record.spec.to_proto()),
            created_unix_ms: record.created_ms,
            updated_unix_ms: record.updated_ms,
            error: record.error,
        })
    }

    async fn result_chunks(&self, request: pb::GetResultRequest) -> Result<Vec<pb::ResultChunk>, ApiError> {
        check_job_id(&request.job_id)?;
        let record = self.store.get(&request.job_id).await?.ok_or_else(|| ApiError::NotFound(request.job_id.clone()))?;
        if record.state != JobState::Completed {
            return Err(ApiError::NotCompleted { job_id: request.job_id, state: record.state.name().into() });
        }
        let chunk = match request.chunk_bytes as usize {
            0 => DEFAULT_CHUNK,
            n => n.min(MAX_CHUNK),
        };
        let png = match self.store.read_blob(&record.png_blob).await? {
            Some(ipb::blob_payload::Payload::Image(png)) => png,
            Some(_) => return Err(ApiError::Internal(anyhow::anyhow!("result blob {} is not an image", record.png_blob))),
            None => return Err(ApiError::ResultExpired(request.job_id)),
        };
        let mut chunks: Vec<pb::ResultChunk> = png
            .chunks(chunk)
            .enumerate()
            .map(|(i, data)| pb::ResultChunk {
                part: Some(pb::result_chunk::Part::Png(pb::PngChunk {
                    offset: (i * chunk) as u64,
                    total_bytes: png.len() as u64,
                    data: data.to_vec(),
                })),
            })
            .collect();
        if request.include_latent {
            let tensor = match self.store.read_blob(&record.latent_blob).await? {
                Some(ipb::blob_payload::Payload::Latent(tensor)) => {
                    WireTensor::from_proto(tensor).map_err(|e| ApiError::Internal(anyhow::anyhow!("final latent blob: {e}")))?
                }
                Some(_) => return Err(ApiError::Internal(anyhow::anyhow!("latent blob {} is not a tensor", record.latent_blob))),
                None => return Err(ApiError::ResultExpired(request.job_id)),
            };
            let header = tensor.to_proto();
            for (i, data) in tensor.data.chunks(chunk).enumerate() {
                chunks.push(pb::ResultChunk {
                    part: Some(pb::result_chunk::Part::Latent(pb::LatentChunk {
                        dtype: header.dtype,
                        shape: header.shape.clone(),
                        crc32c: header.crc32c,
                        offset: (i * chunk) as u64,
                        total_bytes: tensor.data.len() as u64,
                        data: data.to_vec(),
                    })),
                });
            }
        }
        Ok(chunks)
    }
}

#[tonic::async_trait]
impl Pipeline for PipelineService {
    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        Ok(Response::new(self.submit_job(request.into_inner().spec).await?))
    }

    type WatchStream = ResultStream<pb::JobEvent>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let job_id = request.into_inner().job_id;
        check_job_id(&job_id)?;
        let events = watch::watch(self.store.clone(), &self.hub, job_id).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    type GetResultStream = ResultStream<pb::ResultChunk>;

    async fn get_result(&self, request: Request<pb::GetResultRequest>) -> Result<Response<Self::GetResultStream>, Status> {
        let chunks = self.result_chunks(request.into_inner()).await?;
        Ok(Response::new(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))))
    }

    async fn cancel(&self, request: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let job_id = request.into_inner().job_id;
        check_job_id(&job_id)?;
        let (state, transition) = self.store.cancel(&job_id, now_unix_ms()).await?;
        if transition == Transition::Applied {
            tracing::info!(job = %job_id, "cancelled");
            self.metrics.jobs.with_label_values(&["cancelled"]).inc();
            publish(&self.store, &job_id, pb::job_event::Event::Cancelled(pb::Cancelled {})).await;
        }
        Ok(Response::new(pb::CancelResponse { state: state.to_proto() as i32 }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::JobInfo>, Status> {
        Ok(Response::new(self.job_info(&request.into_inner().job_id).await?))
    }

    async fn cluster_status(&self, _request: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let stages = status::cluster_status(&self.store, &self.metrics).await?;
        let active_jobs = self.store.active_jobs().await?;
        let names: Vec<String> = self.limits.profiles.iter().map(|p| p.name.clone()).collect();
        let profiles = status::profile_status(&self.store, &names).await?;
        Ok(Response::new(pb::ClusterStatusResponse { stages, active_jobs, max_queued: self.max_queued, profiles }))
    }
}

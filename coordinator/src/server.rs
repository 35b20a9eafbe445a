//! The `Pipeline` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use fmboost_core::now_unix_ms;
use fmboost_core::spec::{self, Limits, Upload};
use fmboost_proto::internal as ipb;
use fmboost_proto::v1 as pb;
use fmboost_proto::v1::pipeline_server::Pipeline;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{check_job_id, ApiError};
use crate::message_size::check_upload_size;
use crate::metrics::CoordinatorMetrics;
use crate::redis_guard::RedisGuard;
use crate::result_stream::{self, ChunkStream};
use crate::state::publish;
use crate::status;
use crate::store::{JobStore, NewJob, Submitted, Transition};
use crate::watch::{self, WatchHub};

pub struct PipelineService {
    pub store: JobStore,
    pub hub: WatchHub,
    pub limits: Arc<Limits>,
    pub max_queued: u64,
    pub metrics: CoordinatorMetrics,
    pub guard: RedisGuard,
}

type ResultStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl PipelineService {
    async fn submit_job(&self, spec: Option<pb::JobSpec>) -> Result<pb::SubmitResponse, ApiError> {
        let spec = spec.ok_or_else(|| spec::ValidationError { field: "spec".into(), message: "required".into() })?;
        check_upload_size(&spec, &self.limits)?;
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
        self.guard.check()?;
        let submitted = self.store.submit(new_job, now).await;
        if matches!(submitted, Err(ApiError::OutcomeUnknown { .. })) {
            self.metrics.submissions.with_label_values(&["outcome_unknown"]).inc();
        }
        match submitted? {
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
        let differs = match self.guard.bounded(self.store.get(&job_id)).await {
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
        let events = watch::watch(self.store.clone(), &self.hub, &self.guard, job_id).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    type GetResultStream = ChunkStream;

    async fn get_result(&self, request: Request<pb::GetResultRequest>) -> Result<Response<Self::GetResultStream>, Status> {
        Ok(Response::new(result_stream::result_stream(&self.store, &self.guard, request.into_inner()).await?))
    }

    async fn cancel(&self, request: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let job_id = request.into_inner().job_id;
        check_job_id(&job_id)?;
        // Cancelling twice changes nothing, so a timeout here may answer UNAVAILABLE.
        let (state, transition) = self.guard.bounded(self.store.cancel(&job_id, now_unix_ms())).await?;
        if transition == Transition::Applied {
            tracing::info!(job = %job_id, "cancelled");
            self.metrics.jobs.with_label_values(&["cancelled"]).inc();
            publish(&self.store, &job_id, pb::job_event::Event::Cancelled(pb::Cancelled {})).await;
        }
        Ok(Response::new(pb::CancelResponse { state: state.to_proto() as i32 }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::JobInfo>, Status> {
        Ok(Response::new(self.guard.bounded(self.job_info(&request.into_inner().job_id)).await?))
    }

    async fn cluster_status(&self, _request: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let names: Vec<String> = self.limits.profiles.iter().map(|p| p.name.clone()).collect();
        let (stages, active_jobs, profiles) = self
            .guard
            .bounded(async {
                Ok((
                    status::cluster_status(&self.store, &self.metrics).await?,
                    self.store.active_jobs().await?,
                    status::profile_status(&self.store, &names).await?,
                ))
            })
            .await?;
        Ok(Response::new(pb::ClusterStatusResponse { stages, active_jobs, max_queued: self.max_queued, profiles }))
    }
}

//! gRPC access to the coordinator: a few connections used in turn (a server caps the streams
//! of one HTTP/2 connection, and every job holds a Watch stream), the bearer token, status-code
//! names and which errors are worth retrying.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use fmboost_proto::v1::pipeline_client::PipelineClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Pipeline = PipelineClient<InterceptedService<Channel, BearerToken>>;

pub struct Clients {
    clients: Vec<Pipeline>,
    next: AtomicUsize,
}

/// `host:port` or `http://host:port` → an endpoint URI.
pub fn endpoint_uri(target: &str) -> anyhow::Result<String> {
    if target.starts_with("https://") {
        bail!("--target {target}: TLS is not supported by this build; use http:// (or a plain host:port)");
    }
    let uri = if target.starts_with("http://") { target.to_string() } else { format!("http://{target}") };
    uri.parse::<tonic::transport::Uri>().with_context(|| format!("--target {target}: not an address"))?;
    Ok(uri)
}

impl Clients {
    /// Lazily connecting clients (they reconnect by themselves after a coordinator restart).
    pub fn new(uri: &str, connections: usize, token: Option<String>) -> anyhow::Result<Self> {
        let token = token
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<_>>().context("--auth-token-file: the token is not valid header text"))
            .transpose()?;
        let endpoint = Endpoint::from_shared(uri.to_string())
            .with_context(|| format!("{uri}: not an endpoint"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let clients = (0..connections)
            .map(|_| {
                PipelineClient::with_interceptor(endpoint.connect_lazy(), BearerToken(token.clone()))
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(80 << 20)
            })
            .collect();
        Ok(Clients { clients, next: AtomicUsize::new(0) })
    }

    pub fn get(&self) -> Pipeline {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[index].clone()
    }
}

/// The canonical name of a status code (as in the gRPC spec), e.g. `RESOURCE_EXHAUSTED`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Errors a restart or a dropped connection causes; every call the harness retries is safe to
/// repeat (Submit carries an idempotency key, the others only read).
pub fn is_transient(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal | Code::Aborted)
}

/// Every error status the harness received, by call and code.
#[derive(Default)]
pub struct ErrorTally(Mutex<BTreeMap<(&'static str, &'static str), u64>>);

impl ErrorTally {
    pub fn add(&self, call: &'static str, status: &Status) {
        *self.0.lock().expect("error tally lock").entry((call, code_name(status.code()))).or_default() += 1;
    }

    /// Counts by code (all calls together) and by call then code.
    pub fn snapshot(&self) -> (BTreeMap<String, u64>, BTreeMap<String, BTreeMap<String, u64>>) {
        let map = self.0.lock().expect("error tally lock");
        let mut by_code = BTreeMap::new();
        let mut by_call: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (&(call, code), &n) in map.iter() {
            *by_code.entry(code.to_string()).or_default() += n;
            *by_call.entry(call.to_string()).or_default().entry(code.to_string()).or_default() += n;
        }
        (by_code, by_call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_become_http_uris() {
        assert_eq!(endpoint_uri("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
        assert_eq!(endpoint_uri("http://coordinator:50051").unwrap(), "http://coordinator:50051");
        assert!(endpoint_uri("https://x:1").unwrap_err().to_string().contains("TLS"));
        assert!(endpoint_uri("not a host").is_err());
    }

    #[test]
    fn tally_groups_by_code_and_call() {
        let tally = ErrorTally::default();
        tally.add("submit", &Status::resource_exhausted("full"));
        tally.add("submit", &Status::unavailable("down"));
        tally.add("watch", &Status::unavailable("down"));
        let (by_code, by_call) = tally.snapshot();
        assert_eq!(by_code["UNAVAILABLE"], 2);
        assert_eq!(by_code["RESOURCE_EXHAUSTED"], 1);
        assert_eq!(by_call["watch"]["UNAVAILABLE"], 1);
        assert!(!is_transient(Code::ResourceExhausted) && !is_transient(Code::InvalidArgument) && is_transient(Code::Unavailable));
    }
}

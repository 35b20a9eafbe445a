//! Prometheus metrics over HTTP (`GET /metrics`), for the coordinator and the workers.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

/// Histogram buckets for durations in seconds: 1 ms to ~20 min.
pub fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 21).expect("valid bucket spec")
}

/// Histogram buckets for batch sizes.
pub fn batch_buckets() -> Vec<f64> {
    vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0]
}

pub fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let histogram = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid histogram");
    registry.register(Box::new(histogram.clone())).expect("metric registered once");
    histogram
}

pub fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    registry.register(Box::new(counter.clone())).expect("metric registered once");
    counter
}

/// Binds `addr` and serves `registry` at `/metrics` until the process ends. Binding happens
/// before returning, so a bad address is reported at startup.
pub async fn serve(addr: SocketAddr, registry: Registry) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}: cannot bind"))?;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!("metrics listener: {err}");
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(respond(&request, &registry)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(err) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!("metrics connection: {err}");
                }
            });
        }
    }))
}

fn respond(request: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        let mut not_found = Response::new(Full::new(Bytes::from_static(b"not found; try /metrics\n")));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return not_found;
    }
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(err) = encoder.encode(&registry.gather(), &mut body) {
        let mut failed = Response::new(Full::new(Bytes::from(format!("encoding metrics: {err}\n"))));
        *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return failed;
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

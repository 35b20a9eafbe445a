//! Bad input, each answered with a clear status naming the problem, and nothing else harmed:
//! jobs admitted before and after keep working.

mod cluster;

use cluster::{submit, text_spec, Cluster, Options};
use fmboost_core::tensor::WireTensor;
use fmboost_proto::v1 as pb;
use tonic::Code;

const TOKEN: &str = "let-me-in";

fn expect_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{needle:?} not in {:?}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_status_and_harms_nothing() {
    let cluster = Cluster::start(Options { workers: [0, 0, 0], max_queued: 3, max_upload_bytes: 8192, token: Some(TOKEN.into()), ..Options::default() });
    let mut client = cluster.client().await;
    let good = submit(&cluster, &mut client, text_spec(1, 2, 1, 2)).await;

    let bad = |mutate: &dyn Fn(&mut pb::JobSpec)| {
        let mut spec = text_spec(1, 2, 1, 2);
        mutate(&mut spec);
        cluster.authorize(tonic::Request::new(pb::SubmitRequest { spec: Some(spec) }))
    };
    type Mutation = Box<dyn Fn(&mut pb::JobSpec)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("size not divisible by 8", Box::new(|s| s.base.as_mut().unwrap().width = Some(100)), "base.width"),
        ("zero steps", Box::new(|s| s.base.as_mut().unwrap().steps = Some(0)), "base.steps"),
        ("absurd steps", Box::new(|s| s.base.as_mut().unwrap().steps = Some(1_000_000)), "base.steps"),
        ("zero cfm steps", Box::new(|s| s.cfm.as_mut().unwrap().steps = Some(0)), "cfm.steps"),
        ("too many hops", Box::new(|s| s.cfm.as_mut().unwrap().hops = Some(9)), "cfm.hops"),
        ("unknown profile", Box::new(|s| s.profile = "sd99".into()), "profile"),
        ("unknown solver", Box::new(|s| s.cfm.as_mut().unwrap().solver = Some("leapfrog".into())), "cfm.solver"),
        ("NaN guidance", Box::new(|s| s.base.as_mut().unwrap().guidance = Some(f32::NAN)), "base.guidance"),
        ("no source", Box::new(|s| s.source = None), "source"),
        ("deadline in the past", Box::new(|s| s.deadline_unix_ms = 1), "deadline_unix_ms"),
    ];
    for (name, mutate, field) in &cases {
        let result = client.submit(bad(mutate.as_ref())).await;
        let status = result.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().starts_with(field), "{name}: {:?} should name {field}", status.message());
    }

    // Uploaded latents: over the upload limit, wrong checksum, NaNs.
    let latent = |values: &[f32], side: usize| WireTensor::from_f32(vec![1, 4, side, side], values).to_proto();
    let upload = |tensor: pb::Tensor| {
        move |s: &mut pb::JobSpec| {
            s.source = Some(pb::job_spec::Source::Latent(tensor.clone()));
            s.base = None;
        }
    };
    let oversized = latent(&vec![0.5; 4 * 32 * 32], 32); // 16 KiB > 8 KiB
    expect_status(client.submit(bad(&upload(oversized))).await, Code::ResourceExhausted, "source.latent: 16384 bytes exceed the limit of 8192");
    let mut wrong_checksum = latent(&[0.5; 256], 8);
    wrong_checksum.crc32c ^= 0xdead;
    expect_status(client.submit(bad(&upload(wrong_checksum))).await, Code::InvalidArgument, "checksum mismatch");
    let mut values = [0.5f32; 256];
    values[7] = f32::NAN;
    expect_status(client.submit(bad(&upload(latent(&values, 8)))).await, Code::InvalidArgument, "non-finite value");
    // Far beyond the message limit: refused by the transport before decoding, by the same rule.
    let huge = latent(&vec![0.5; 4 * 512 * 512], 512); // 4 MiB
    expect_status(client.submit(bad(&upload(huge))).await, Code::ResourceExhausted, "request message too large");
    // An upload that is not an image.
    let not_image = |s: &mut pb::JobSpec| {
        s.source = Some(pb::job_spec::Source::Image(pb::ImageSource { data: b"GIF89a-not-really".to_vec() }));
        s.base = None;
    };
    expect_status(client.submit(bad(&not_image)).await, Code::InvalidArgument, "source.image.data");

    // Unknown and malformed job ids.
    let unknown = "00000000-0000-4000-8000-000000000000".to_string();
    expect_status(client.get_job(cluster.req(pb::GetJobRequest { job_id: unknown.clone() })).await, Code::NotFound, "unknown job id");
    expect_status(client.cancel(cluster.req(pb::CancelRequest { job_id: unknown.clone() })).await, Code::NotFound, "unknown job id");
    expect_status(client.watch(cluster.req(pb::WatchRequest { job_id: unknown.clone() })).await, Code::NotFound, "unknown job id");
    let get_result = pb::GetResultRequest { job_id: unknown, include_latent: false, chunk_bytes: 0 };
    expect_status(client.get_result(cluster.req(get_result)).await, Code::NotFound, "unknown job id");
    expect_status(client.get_job(cluster.req(pb::GetJobRequest { job_id: "../etc".into() })).await, Code::InvalidArgument, "job_id");
    // The result of an unfinished job.
    let get_result = pb::GetResultRequest { job_id: good.clone(), include_latent: false, chunk_bytes: 0 };
    expect_status(client.get_result(cluster.req(get_result)).await, Code::FailedPrecondition, "queued");

    // A full queue: 3 admitted, the 4th refused.
    submit(&cluster, &mut client, text_spec(2, 2, 1, 2)).await;
    submit(&cluster, &mut client, text_spec(3, 2, 1, 2)).await;
    let request = cluster.req(pb::SubmitRequest { spec: Some(text_spec(4, 2, 1, 2)) });
    expect_status(client.submit(request).await, Code::ResourceExhausted, "--max-queued 3");

    // Auth: no token, a wrong token.
    let mut plain = cluster.client().await;
    expect_status(plain.get_job(pb::GetJobRequest { job_id: good.clone() }).await, Code::Unauthenticated, "missing");
    let mut wrong = tonic::Request::new(pb::GetJobRequest { job_id: good.clone() });
    wrong.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
    expect_status(plain.get_job(wrong).await, Code::Unauthenticated, "wrong bearer token");

    // Nothing else harmed: the first job is still queued, and after cancelling it a new job fits.
    let info = client.get_job(cluster.req(pb::GetJobRequest { job_id: good.clone() })).await.unwrap().into_inner();
    assert_eq!(info.state, pb::JobState::Queued as i32);
    client.cancel(cluster.req(pb::CancelRequest { job_id: good })).await.unwrap();
    submit(&cluster, &mut client, text_spec(5, 2, 1, 2)).await;
    let status = client.cluster_status(cluster.req(pb::ClusterStatusRequest {})).await.unwrap().into_inner();
    assert_eq!((status.active_jobs, status.stages[0].queued), (3, 3), "{status:?}");
}

#[test]
fn cli_reports_bad_flags_by_name() {
    let cluster = Cluster::start(Options { workers: [0, 0, 0], ..Options::default() });
    let output = cluster.cli(&["submit", "--profile", "sleep", "--steps", "0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("InvalidArgument") && stderr.contains("base.steps"), "{stderr}");
    let output = cluster.cli(&["submit", "--profile", "sleep", "--hops", "0", "--cfm-steps", "3"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("--cfm-steps does not apply with --hops 0"));
}

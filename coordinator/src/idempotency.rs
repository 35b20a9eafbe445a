//! What "the same spec" means for an idempotency key: the admitted spec (the profile's
//! defaults filled in, so leaving a field unset and sending its default are the same) plus
//! the uploaded payload's bytes. A key sent again with the same spec returns the first job;
//! with another it is ALREADY_EXISTS, naming the key, the job and what differs.

use fmboost_core::spec::JobSpec;
use fmboost_proto::internal as ipb;
use prost::Message;

/// SHA-1 (hex) of the admitted spec's wire form and the upload's: the digest the key keeps.
/// prost encodes a message's fields in order, so equal specs give equal bytes.
pub fn fingerprint(spec: &JobSpec, upload: Option<&ipb::BlobPayload>) -> String {
    let mut sha = sha1_smol::Sha1::new();
    let spec = spec.to_proto().encode_to_vec();
    sha.update(&(spec.len() as u64).to_le_bytes());
    sha.update(&spec);
    if let Some(upload) = upload {
        sha.update(&upload.encode_to_vec());
    }
    sha.digest().to_string()
}

/// The parts of `submitted` that differ from the job's admitted spec, for the error message;
/// "the uploaded payload" when only the bytes differ.
pub fn differences(existing: &JobSpec, submitted: &JobSpec) -> Vec<&'static str> {
    let mut parts = Vec::new();
    let mut differs = |name, differ: bool| {
        if differ {
            parts.push(name);
        }
    };
    differs("profile", existing.profile != submitted.profile);
    differs("source", existing.source != submitted.source);
    differs("seed", existing.seed != submitted.seed);
    differs("base", existing.base != submitted.base);
    differs("cfm", existing.cfm != submitted.cfm);
    differs("decode", existing.decode != submitted.decode);
    differs("priority", existing.priority != submitted.priority);
    differs("deadline_unix_ms", existing.deadline_unix_ms != submitted.deadline_unix_ms);
    if parts.is_empty() {
        parts.push("the uploaded payload");
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use fmboost_core::profile::ProfileInfo;
    use fmboost_core::spec::{validate, Limits};
    use fmboost_proto::v1 as pb;

    fn admitted(spec: pb::JobSpec) -> JobSpec {
        validate(spec, &Limits::new(vec![ProfileInfo::resolve("sleep").unwrap()], 1 << 20), 0).unwrap().0
    }

    fn spec(seed: u64) -> pb::JobSpec {
        pb::JobSpec {
            source: Some(pb::job_spec::Source::Text(pb::TextSource { prompt: "a".into(), negative_prompt: String::new() })),
            seed,
            profile: "sleep".into(),
            idempotency_key: "k".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_same_admitted_spec_and_payload_give_the_same_fingerprint() {
        let a = admitted(spec(1));
        // Sending the profile's default explicitly is the same job as leaving it unset.
        let explicit = admitted(pb::JobSpec { cfm: Some(pb::CfmSettings { hops: Some(2), ..Default::default() }), ..spec(1) });
        assert_eq!(fingerprint(&a, None), fingerprint(&explicit, None));
        let b = admitted(spec(2));
        assert_ne!(fingerprint(&a, None), fingerprint(&b, None));
        assert_eq!(differences(&a, &b), ["seed"]);
        let payload = |byte| ipb::BlobPayload { payload: Some(ipb::blob_payload::Payload::Image(vec![byte; 4])) };
        assert_ne!(fingerprint(&a, Some(&payload(1))), fingerprint(&a, Some(&payload(2))));
        assert_eq!(differences(&a, &a), ["the uploaded payload"]);
    }
}

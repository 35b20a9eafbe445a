use super::*;

fn limits() -> Limits {
    Limits::new(vec!["tiny".into(), "sleep".into()], 1 << 16)
}

fn text(width: u32, height: u32, hops: u32) -> pb::JobSpec {
    pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource { prompt: "a cat".into(), negative_prompt: String::new() })),
        seed: 7,
        base: Some(pb::BaseSettings { width, height, steps: 20, scheduler: "ddim".into(), guidance: 7.5 }),
        cfm: Some(if hops == 0 { pb::CfmSettings::default() } else { pb::CfmSettings { hops, solver: "euler".into(), steps: 40 } }),
        decode: Some(pb::DecodeSettings::default()),
        profile: "tiny".into(),
        priority: 0,
        deadline_unix_ms: 0,
        idempotency_key: String::new(),
    }
}

fn field_of(spec: pb::JobSpec) -> String {
    validate(spec, &limits(), 1000).unwrap_err().field
}

#[test]
fn plans_the_stages_of_a_text_job() {
    let (job, upload) = validate(text(512, 384, 2), &limits(), 1000).unwrap();
    assert!(upload.is_none());
    assert_eq!(job.priority, Priority::Normal);
    assert_eq!(job.base_latent_size(), (48, 64));
    assert_eq!(job.latent_size_after(2), (192, 256));
    assert_eq!(job.output_size(), (2048, 1536));
    let mut at = job.first_stage();
    let mut plan = vec![at.to_string()];
    while let Some(next) = job.next_stage(at) {
        plan.push(next.to_string());
        at = next;
    }
    assert_eq!(plan, ["diffusion", "cfm hop 1", "cfm hop 2", "decoder"]);
}

#[test]
fn admitted_spec_round_trips_without_payload() {
    let latent = WireTensor::from_f32(vec![4, 8, 8], &[0.1; 256]);
    let spec = pb::JobSpec { source: Some(pb::job_spec::Source::Latent(latent.to_proto())), base: None, ..text(64, 64, 1) };
    let (job, upload) = validate(spec, &limits(), 1000).unwrap();
    let Some(Upload::Latent(uploaded)) = upload else { panic!("latent upload expected") };
    assert_eq!(uploaded.shape, vec![1, 4, 8, 8], "a [C, H, W] latent gets its batch dimension");
    let wire = job.to_proto();
    let Some(pb::job_spec::Source::Latent(header)) = &wire.source else { panic!() };
    assert!(header.data.is_empty());
    assert_eq!(JobSpec::from_admitted(wire).unwrap(), job);
    assert_eq!(job.first_stage(), StageRef { kind: StageKind::Cfm, hop: 1 });
}

#[test]
fn latent_source_without_hops_goes_straight_to_the_decoder() {
    let latent = WireTensor::from_f32(vec![1, 4, 8, 8], &[0.1; 256]);
    let spec = pb::JobSpec { source: Some(pb::job_spec::Source::Latent(latent.to_proto())), base: None, ..text(64, 64, 0) };
    let (job, _) = validate(spec, &limits(), 1000).unwrap();
    assert_eq!(job.first_stage(), StageRef { kind: StageKind::Decoder, hop: 0 });
    assert_eq!(job.next_stage(job.first_stage()), None);
}

#[test]
fn image_source_records_its_size() {
    let mut png = Vec::new();
    image::RgbImage::new(72, 40).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let spec = pb::JobSpec { source: Some(pb::job_spec::Source::Image(pb::ImageSource { data: png })), base: None, ..text(64, 64, 1) };
    let (job, upload) = validate(spec, &limits(), 1000).unwrap();
    assert!(matches!(upload, Some(Upload::Image(_))));
    assert_eq!(job.source, Source::Image { width: 72, height: 40 });
    assert_eq!(JobSpec::from_admitted(job.to_proto()).unwrap(), job);
    let mut odd = Vec::new();
    image::RgbImage::new(70, 40).write_to(&mut std::io::Cursor::new(&mut odd), image::ImageFormat::Png).unwrap();
    let spec = pb::JobSpec { source: Some(pb::job_spec::Source::Image(pb::ImageSource { data: odd })), base: None, ..text(64, 64, 1) };
    assert_eq!(field_of(spec), "source.image.width");
}

#[test]
fn errors_name_the_field() {
    let mut spec = text(100, 64, 1);
    assert_eq!(field_of(spec.clone()), "base.width");
    spec = text(64, 0, 1);
    assert_eq!(field_of(spec), "base.height");
    let with = |f: &dyn Fn(&mut pb::JobSpec)| {
        let mut spec = text(64, 64, 1);
        f(&mut spec);
        field_of(spec)
    };
    assert_eq!(with(&|s| s.base.as_mut().unwrap().steps = 0), "base.steps");
    assert_eq!(with(&|s| s.base.as_mut().unwrap().steps = 5000), "base.steps");
    assert_eq!(with(&|s| s.base.as_mut().unwrap().scheduler = "plms".into()), "base.scheduler");
    assert_eq!(with(&|s| s.base.as_mut().unwrap().guidance = f32::INFINITY), "base.guidance");
    assert_eq!(with(&|s| s.cfm.as_mut().unwrap().steps = 0), "cfm.steps");
    assert_eq!(with(&|s| s.cfm.as_mut().unwrap().hops = 5), "cfm.hops");
    assert_eq!(with(&|s| s.cfm = Some(pb::CfmSettings { hops: 0, solver: String::new(), steps: 3 })), "cfm");
    assert_eq!(with(&|s| s.profile = "sd15".into()), "profile");
    assert_eq!(with(&|s| s.profile = String::new()), "profile");
    assert_eq!(with(&|s| s.priority = 42), "priority");
    assert_eq!(with(&|s| s.base = None), "base");
    assert_eq!(with(&|s| s.source = None), "source");
    assert_eq!(with(&|s| s.decode = Some(pb::DecodeSettings { tile: 0, overlap: 2 })), "decode.overlap");
    assert_eq!(with(&|s| s.decode = Some(pb::DecodeSettings { tile: 4, overlap: 0 })), "decode.tile");
    assert_eq!(with(&|s| s.decode = Some(pb::DecodeSettings { tile: 8, overlap: 4 })), "decode.overlap");
    assert_eq!(with(&|s| s.deadline_unix_ms = 999), "deadline_unix_ms");
    // 2048 px base with 3 hops would decode to 16384 px a side.
    let mut big = text(2048, 2048, 3);
    big.cfm.as_mut().unwrap().hops = 3;
    assert_eq!(field_of(big), "cfm.hops");
}

#[test]
fn rejects_bad_uploads() {
    let upload = |tensor: pb::Tensor| pb::JobSpec { source: Some(pb::job_spec::Source::Latent(tensor)), base: None, ..text(64, 64, 1) };
    let big = WireTensor::from_f32(vec![1, 4, 128, 128], &vec![0.0; 4 * 128 * 128]);
    let err = validate(upload(big.to_proto()), &limits(), 0).unwrap_err();
    assert!(err.message.contains("exceeds the limit"), "{err}");
    let mut bad_crc = WireTensor::from_f32(vec![1, 4, 8, 8], &[0.5; 256]).to_proto();
    bad_crc.crc32c ^= 1;
    assert!(validate(upload(bad_crc), &limits(), 0).unwrap_err().message.contains("checksum"));
    let nan = WireTensor::from_f32(vec![1, 4, 2, 2], &[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert!(validate(upload(nan.to_proto()), &limits(), 0).unwrap_err().message.contains("non-finite"));
    let batch2 = WireTensor::from_f32(vec![2, 4, 2, 2], &[0.0; 32]);
    assert!(validate(upload(batch2.to_proto()), &limits(), 0).unwrap_err().message.contains("shape"));
    let garbage = pb::JobSpec { source: Some(pb::job_spec::Source::Image(pb::ImageSource { data: b"nope".to_vec() })), base: None, ..text(64, 64, 1) };
    assert_eq!(field_of(garbage), "source.image.data");
}

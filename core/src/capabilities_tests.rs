use crate::profile::ProfileInfo;
use crate::spec::{validate, Limits};
use crate::tensor::WireTensor;
use fmboost_proto::v1 as pb;

fn limits() -> Limits {
    Limits::new(vec![ProfileInfo::resolve("tiny").unwrap(), ProfileInfo::resolve("sleep").unwrap()], 1 << 20)
}

/// What a client of the tiny profile sends when it leaves everything to the defaults.
fn tiny() -> pb::JobSpec {
    pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource::default())),
        seed: 1,
        profile: "tiny".into(),
        ..Default::default()
    }
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(width, height).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png
}

fn image_source(width: u32, height: u32) -> Option<pb::job_spec::Source> {
    Some(pb::job_spec::Source::Image(pb::ImageSource { data: png(width, height) }))
}

fn latent_source(shape: [usize; 4]) -> Option<pb::job_spec::Source> {
    let values = vec![0.1; shape.iter().product()];
    Some(pb::job_spec::Source::Latent(WireTensor::from_f32(shape.to_vec(), &values).to_proto()))
}

/// The field a rejected spec names, with the message.
fn rejection(spec: pb::JobSpec) -> (String, String) {
    let err = validate(spec, &limits(), 0).expect_err("should be rejected");
    (err.field, err.message)
}

fn with(mutate: impl Fn(&mut pb::JobSpec)) -> pb::JobSpec {
    let mut spec = tiny();
    mutate(&mut spec);
    spec
}

fn base(mutate: impl Fn(&mut pb::BaseSettings)) -> pb::JobSpec {
    with(|s| {
        let mut settings = pb::BaseSettings::default();
        mutate(&mut settings);
        s.base = Some(settings);
    })
}

fn text(prompt: &str, negative_prompt: &str) -> Option<pb::job_spec::Source> {
    Some(pb::job_spec::Source::Text(pb::TextSource { prompt: prompt.into(), negative_prompt: negative_prompt.into() }))
}

#[test]
fn tiny_admits_what_its_models_run() {
    let ok = |spec: pb::JobSpec| validate(spec, &limits(), 0).unwrap_or_else(|e| panic!("rejected: {e}"));
    ok(tiny());
    ok(base(|b| {
        b.width = Some(64);
        b.height = Some(64);
        b.scheduler = Some("euler".into());
        b.guidance = Some(1.0);
    }));
    ok(with(|s| s.cfm = Some(pb::CfmSettings { hops: Some(1), ..Default::default() })));
    // 16 px is the smallest image side two hops run on (8 × latent_multiple 2); without hops
    // any multiple of 8 decodes.
    ok(with(|s| s.source = image_source(16, 32)));
    ok(with(|s| {
        s.source = image_source(8, 8);
        s.cfm = Some(pb::CfmSettings { hops: Some(0), ..Default::default() });
    }));
    ok(with(|s| s.source = latent_source([1, 4, 6, 10])));
    ok(with(|s| {
        s.source = latent_source([1, 4, 5, 5]);
        s.cfm = Some(pb::CfmSettings { hops: Some(0), ..Default::default() });
    }));
}

#[test]
fn tiny_rejects_what_its_workers_would_fail_naming_the_field() {
    let cases: Vec<(&str, pb::JobSpec, &str, &str)> = vec![
        ("a prompt", with(|s| s.source = text("a cat", "")), "source.text.prompt", "unconditional"),
        ("a negative prompt", with(|s| s.source = text("", "blurry")), "source.text.negative_prompt", "unconditional"),
        ("guidance 7.5", base(|b| b.guidance = Some(7.5)), "base.guidance", "must be 1"),
        ("guidance 0", base(|b| b.guidance = Some(0.0)), "base.guidance", "must be 1"),
        ("ddim", base(|b| b.scheduler = Some("ddim".into())), "base.scheduler", "serves euler"),
        ("a 128 px wide base", base(|b| b.width = Some(128)), "base.width", "64x64"),
        ("a 32 px high base", base(|b| b.height = Some(32)), "base.height", "64x64"),
        ("a 3-channel latent", with(|s| s.source = latent_source([1, 3, 8, 8])), "source.latent", "4 channels"),
        ("an 8-channel latent, no hops", with(|s| {
            s.source = latent_source([1, 8, 8, 8]);
            s.cfm = Some(pb::CfmSettings { hops: Some(0), ..Default::default() });
        }), "source.latent", "4 channels"),
        ("an odd latent side", with(|s| s.source = latent_source([1, 4, 8, 5])), "source.latent", "multiples of 2"),
        ("an 8x8 image", with(|s| s.source = image_source(8, 8)), "source.image.width", "multiples of 16 px"),
        ("a 24 px high image", with(|s| s.source = image_source(32, 24)), "source.image.height", "multiples of 16 px"),
        ("three hops", with(|s| s.cfm = Some(pb::CfmSettings { hops: Some(3), ..Default::default() })), "cfm.hops", "has 2 CFM hops"),
    ];
    for (name, spec, field, needle) in cases {
        let (got, message) = rejection(spec);
        assert_eq!(got, field, "{name}: {message}");
        assert!(message.contains(needle) && message.contains("profile `tiny`"), "{name}: {needle:?} not in {message:?}");
    }
}

#[test]
fn sleep_stands_in_for_stable_diffusion() {
    let sleep = |mutate: &dyn Fn(&mut pb::JobSpec)| {
        let mut spec = pb::JobSpec { profile: "sleep".into(), source: text("a lighthouse", ""), ..Default::default() };
        spec.base = Some(pb::BaseSettings { width: Some(64), height: Some(48), ..Default::default() });
        mutate(&mut spec);
        spec
    };
    validate(sleep(&|_| {}), &limits(), 0).unwrap();
    validate(sleep(&|s| s.cfm = Some(pb::CfmSettings { hops: Some(4), ..Default::default() })), &limits(), 0).unwrap();
    validate(sleep(&|s| s.source = text("a", "fog")), &limits(), 0).unwrap();
    // A negative prompt without guidance would be ignored: say so.
    let (field, message) = rejection(sleep(&|s| {
        s.source = text("a", "fog");
        s.base.as_mut().unwrap().guidance = Some(1.0);
    }));
    assert_eq!(field, "source.text.negative_prompt", "{message}");
    let (field, _) = rejection(sleep(&|s| {
        s.source = latent_source([1, 3, 8, 8]);
        s.base = None;
    }));
    assert_eq!(field, "source.latent");
}

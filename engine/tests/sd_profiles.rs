//! Whole SD profiles on the fixture directories (../shared/fixtures, unchanged) in one process:
//! text prompt → base latent → one CFM hop → PNG, deterministic, through the executors the
//! worker pools run. The cluster side of the same profiles is coordinator/tests/e2e_sd.rs.

#[path = "support/sd_profile.rs"]
mod sd_profile;

use std::sync::Arc;

use candle_core::Device;
use fmboost_core::profile::ProfileInfo;
use fmboost_core::spec::{validate, Limits};
use fmboost_engine::local::LocalPipeline;
use fmboost_engine::picture::read_png_parameters;
use fmboost_engine::registry::resolve_profile;
use fmboost_engine::stack::{Needs, ProfileModels};
use fmboost_proto::v1 as pb;
use sd_profile::Fixture;

struct Loaded {
    pipeline: LocalPipeline,
    limits: Limits,
    _dir: tempfile::TempDir,
}

fn load(fixture: Fixture) -> Loaded {
    let dir = tempfile::tempdir().unwrap();
    let profile = sd_profile::write_profile(dir.path(), fixture);
    let profile = profile.to_str().unwrap();
    let (spec, files) = resolve_profile(profile).unwrap();
    let models = ProfileModels::load(spec, files, Needs::ALL, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let limits = Limits::new(vec![ProfileInfo::resolve(profile).unwrap()], 1 << 20);
    Loaded { pipeline: LocalPipeline::new(Arc::new(models)), limits, _dir: dir }
}

fn text_job(fixture: Fixture, prompt: &str, seed: u64) -> pb::JobSpec {
    pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource { prompt: prompt.into(), negative_prompt: "blurry".into() })),
        seed,
        profile: fixture.profile_name().into(),
        ..Default::default()
    }
}

fn run(loaded: &Loaded, spec: pb::JobSpec) -> fmboost_engine::local::LocalResult {
    let (spec, upload) = validate(spec, &loaded.limits, 0).unwrap();
    loaded.pipeline.run(&spec, upload, &mut |_, _, _| true).unwrap_or_else(|(stage, e)| panic!("{stage}: {e}"))
}

#[test]
fn both_fixture_profiles_generate_from_text_with_a_cfm_hop() {
    let mut finals = Vec::new();
    for fixture in [Fixture::F32, Fixture::Fp16] {
        let loaded = load(fixture);
        let a = run(&loaded, text_job(fixture, "a photo of a cat", 7));
        let b = run(&loaded, text_job(fixture, "a photo of a cat", 7));
        assert_eq!(a.png, b.png, "{fixture:?}: same job, same bytes");
        // The profile's defaults: 64 px base (8² latent) → one hop (16²) → 128 px.
        assert_eq!(a.final_latent.shape, vec![1, 4, 16, 16], "{fixture:?}");
        let image = image::load_from_memory(&a.png).unwrap();
        assert_eq!((image.width(), image.height()), (128, 128), "{fixture:?}");
        let parameters = read_png_parameters(&a.png).unwrap().unwrap();
        assert!(parameters.contains("a photo of a cat") && parameters.contains(fixture.profile_name()), "{parameters}");
        let dog = run(&loaded, text_job(fixture, "a photo of a dog", 7));
        assert_ne!(dog.png, a.png, "{fixture:?}: the prompt reaches the image");
        finals.push(a.final_latent.to_f32());
    }
    // The fp16 directory is the f32 one rounded: close latents, not equal ones.
    let (f32_latent, fp16_latent) = (&finals[0], &finals[1]);
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = f32_latent.iter().zip(fp16_latent).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(f32_latent);
    assert!(rel > 0.0 && rel < 5e-2, "fp16 vs f32 fixture: relative difference {rel}");
}

//! The embedded `tiny` profile end to end in one process, and the determinism the cluster
//! relies on: the same job gives the same bytes, alone or batched.

use std::sync::Arc;

use candle_core::Device;
use fmboost_core::spec::{validate, Limits};
use fmboost_core::stage::{StageExecutor, StageInput, StageKind, StageOutput, StageTask};
use fmboost_engine::executor::ModelExecutor;
use fmboost_engine::local::LocalPipeline;
use fmboost_engine::picture::read_png_parameters;
use fmboost_engine::registry::{resolve_profile, TINY};
use fmboost_engine::stack::{Needs, ProfileModels};
use fmboost_proto::v1 as pb;

fn tiny_models() -> Arc<ProfileModels> {
    let (spec, files) = resolve_profile(TINY).unwrap();
    Arc::new(ProfileModels::load(spec, files, Needs::ALL, &Device::Cpu).unwrap())
}

fn tiny_spec(seed: u64) -> pb::JobSpec {
    pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource { prompt: String::new(), negative_prompt: String::new() })),
        seed,
        base: Some(pb::BaseSettings { steps: Some(4), ..Default::default() }),
        cfm: Some(pb::CfmSettings { steps: Some(3), ..Default::default() }),
        decode: Some(pb::DecodeSettings { tile: 0, overlap: 0 }),
        profile: TINY.into(),
        ..Default::default()
    }
}

fn limits() -> Limits {
    Limits::new(vec![fmboost_core::profile::ProfileInfo::resolve(TINY).unwrap()], 1 << 20)
}

#[test]
fn tiny_generates_a_256px_png_deterministically() {
    let pipeline = LocalPipeline::new(tiny_models());
    let (spec, upload) = validate(tiny_spec(7), &limits(), 0).unwrap();
    let mut steps = 0;
    let a = pipeline.run(&spec, upload.clone(), &mut |_, _, _| { steps += 1; true }).unwrap();
    let b = pipeline.run(&spec, upload, &mut |_, _, _| true).unwrap();
    assert_eq!(a.png, b.png, "same seed, same bytes");
    assert_eq!(steps, 4 + 3 + 3 + 1);
    let image = image::load_from_memory(&a.png).unwrap();
    assert_eq!((image.width(), image.height()), (256, 256));
    assert_eq!(a.final_latent.shape, vec![1, 4, 32, 32]);
    let parameters = read_png_parameters(&a.png).unwrap().unwrap();
    assert!(parameters.contains("Seed: 7") && parameters.contains("Profile: tiny"), "{parameters}");

    let (other, upload) = validate(tiny_spec(8), &limits(), 0).unwrap();
    let c = pipeline.run(&other, upload, &mut |_, _, _| true).unwrap();
    assert_ne!(a.png, c.png, "another seed, another image");
}

#[test]
fn batching_does_not_change_any_job_output() {
    let models = tiny_models();
    let executor = ModelExecutor::new(StageKind::Diffusion, models.clone());
    assert_batch_invariant(&executor, models);
}

#[test]
fn stacked_batches_run_and_stay_close_to_single_runs() {
    let models = tiny_models();
    let executor = ModelExecutor::new(StageKind::Diffusion, models).stacked(true);
    let task = |seed| {
        let (spec, _) = validate(tiny_spec(seed), &limits(), 0).unwrap();
        StageTask { job_id: format!("job-{seed}"), spec, hop: 0, input: StageInput::Text }
    };
    let tasks = [task(1), task(2)];
    let batched = executor.run_batch(&tasks, &mut |_, _, _| true);
    for (task, output) in tasks.iter().zip(batched) {
        let single = executor.run_batch(std::slice::from_ref(task), &mut |_, _, _| true).remove(0);
        let (Ok(StageOutput::Latent(a)), Ok(StageOutput::Latent(b))) = (output, single) else { panic!() };
        let max_diff = a.to_f32().iter().zip(b.to_f32()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "{}: stacked differs by {max_diff}", task.job_id);
    }
}

fn assert_batch_invariant(executor: &ModelExecutor, models: Arc<ProfileModels>) {
    let task = |seed| {
        let (spec, _) = validate(tiny_spec(seed), &limits(), 0).unwrap();
        StageTask { job_id: format!("job-{seed}"), spec, hop: 0, input: StageInput::Text }
    };
    let tasks = [task(1), task(2), task(3)];
    assert_eq!(executor.batch_key(&tasks[0]), executor.batch_key(&tasks[2]));
    let batched = executor.run_batch(&tasks, &mut |_, _, _| true);
    let cfm = ModelExecutor::new(StageKind::Cfm, models);
    let mut hop_tasks = Vec::new();
    for (task, output) in tasks.iter().zip(&batched) {
        let single = executor.run_batch(std::slice::from_ref(task), &mut |_, _, _| true);
        assert_eq!(output, &single[0], "{}: batched differs from alone", task.job_id);
        let Ok(StageOutput::Latent(latent)) = output else { panic!("{output:?}") };
        hop_tasks.push(StageTask { hop: 1, input: StageInput::Latent(latent.clone()), ..task.clone() });
    }
    let batched = cfm.run_batch(&hop_tasks, &mut |_, _, _| true);
    for (task, output) in hop_tasks.iter().zip(&batched) {
        assert_eq!(output, &cfm.run_batch(std::slice::from_ref(task), &mut |_, _, _| true)[0], "cfm hop of {}", task.job_id);
    }
}

#[test]
fn cancelling_one_task_of_a_batch_spares_the_others() {
    let executor = ModelExecutor::new(StageKind::Diffusion, tiny_models());
    let task = |seed| {
        let (spec, _) = validate(tiny_spec(seed), &limits(), 0).unwrap();
        StageTask { job_id: format!("job-{seed}"), spec, hop: 0, input: StageInput::Text }
    };
    let mut seen = 0;
    let results = executor.run_batch(&[task(1), task(2)], &mut |index, step, _| {
        seen = seen.max(step);
        !(index == 0 && step == 2)
    });
    assert!(matches!(results[0], Err(fmboost_core::stage::StageError::Cancelled)), "{:?}", results[0]);
    assert!(results[1].is_ok());
    // Cancelling every task stops the loop at that step.
    let mut last = 0;
    let results = executor.run_batch(&[task(1)], &mut |_, step, _| {
        last = step;
        step < 2
    });
    assert!(matches!(results[0], Err(fmboost_core::stage::StageError::Cancelled)));
    assert_eq!(last, 2);
}

#[test]
fn a_prompt_for_the_unconditional_tiny_base_is_a_clear_error() {
    let mut spec = tiny_spec(1);
    spec.source = Some(pb::job_spec::Source::Text(pb::TextSource { prompt: "a cat".into(), negative_prompt: String::new() }));
    assert_eq!(validate(spec, &limits(), 0).unwrap_err().field, "source.text.prompt", "admission refuses it");
    // A task that got past admission anyway (another coordinator's profile file) still fails clearly.
    let executor = ModelExecutor::new(StageKind::Diffusion, tiny_models());
    let (mut spec, _) = validate(tiny_spec(1), &limits(), 0).unwrap();
    spec.source = fmboost_core::spec::Source::Text { prompt: "a cat".into(), negative_prompt: String::new() };
    let results = executor.run_batch(&[StageTask { job_id: "j".into(), spec, hop: 0, input: StageInput::Text }], &mut |_, _, _| true);
    let err = results[0].clone().unwrap_err().to_string();
    assert!(err.contains("unconditional") && err.contains("a cat"), "{err}");
}

/// The edges of tiny's `[capabilities]` run: the smallest image two hops take (16 px), a
/// latent with even (not multiple-of-4) sides, an 8 px image without hops.
#[test]
fn what_admission_lets_through_runs_on_the_tiny_models() {
    let pipeline = LocalPipeline::new(tiny_models());
    let png = |width, height| {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(width, height, image::Rgb([90, 140, 200]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        Some(pb::job_spec::Source::Image(pb::ImageSource { data: png }))
    };
    let latent = fmboost_core::tensor::WireTensor::from_f32(vec![1, 4, 6, 10], &[0.1; 240]).to_proto();
    let cases = [
        (png(16, 32), None, (64, 128)),
        (Some(pb::job_spec::Source::Latent(latent)), None, (320, 192)),
        (png(8, 8), Some(0), (8, 8)),
    ];
    for (source, hops, size) in cases {
        let spec = pb::JobSpec { source, base: None, cfm: Some(pb::CfmSettings { hops, ..Default::default() }), ..tiny_spec(3) };
        let (spec, upload) = validate(spec, &limits(), 0).unwrap_or_else(|e| panic!("admission: {e}"));
        let result = pipeline.run(&spec, upload, &mut |_, _, _| true).unwrap_or_else(|(stage, e)| panic!("{stage}: {e}"));
        let image = image::load_from_memory(&result.png).unwrap();
        assert_eq!((image.width(), image.height()), size);
    }
}

#[test]
fn the_latent_multiple_follows_the_hop_unets() {
    use fmboost_engine::capabilities::required_latent_multiple;
    let (spec, files) = resolve_profile(TINY).unwrap();
    let config = |path: &std::path::Path| fmboost_models::cfm::UNetConfig::from_json(&files.read_to_string(path).unwrap()).unwrap();
    let hops: Vec<_> = spec.hops.iter().map(|h| config(&h.config)).collect();
    assert_eq!(required_latent_multiple(&hops), spec.capabilities.latent_multiple);
    // Three levels (two halvings) at hop 1 need an even latent; four levels need a multiple of 4.
    let deeper = fmboost_models::cfm::UNetConfig { channel_mult: vec![1, 2, 2, 2], ..hops[0].clone() };
    assert_eq!(required_latent_multiple([&deeper]), 4);
    assert_eq!(required_latent_multiple([&deeper, &deeper]), 4);
    assert_eq!(required_latent_multiple(&hops[..0]), 1);
}

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
        base: Some(pb::BaseSettings { width: 64, height: 64, steps: 4, scheduler: "euler".into(), guidance: 1.0 }),
        cfm: Some(pb::CfmSettings { hops: 2, solver: "euler".into(), steps: 3 }),
        decode: Some(pb::DecodeSettings { tile: 0, overlap: 0 }),
        profile: TINY.into(),
        ..Default::default()
    }
}

fn limits() -> Limits {
    Limits::new(vec![TINY.into()], 1 << 20)
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
    let executor = ModelExecutor::new(StageKind::Diffusion, tiny_models());
    let mut spec = tiny_spec(1);
    spec.source = Some(pb::job_spec::Source::Text(pb::TextSource { prompt: "a cat".into(), negative_prompt: String::new() }));
    let (spec, _) = validate(spec, &limits(), 0).unwrap();
    let results = executor.run_batch(&[StageTask { job_id: "j".into(), spec, hop: 0, input: StageInput::Text }], &mut |_, _, _| true);
    let err = results[0].clone().unwrap_err().to_string();
    assert!(err.contains("unconditional") && err.contains("a cat"), "{err}");
}

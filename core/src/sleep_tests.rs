use super::*;
use crate::spec::{validate, Limits};
use fmboost_proto::v1 as pb;

fn spec(hops: u32) -> JobSpec {
    let spec = pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource { prompt: "p".into(), negative_prompt: String::new() })),
        seed: 3,
        base: Some(pb::BaseSettings { width: 64, height: 32, steps: 4, scheduler: "ddim".into(), guidance: 5.0 }),
        cfm: Some(pb::CfmSettings { hops, solver: "euler".into(), steps: 3 }),
        decode: Some(pb::DecodeSettings::default()),
        profile: PROFILE.into(),
        ..Default::default()
    };
    validate(spec, &Limits::new(vec![PROFILE.into()], 1 << 20), 0).unwrap().0
}

fn task(spec: &JobSpec, hop: u32, input: StageInput) -> StageTask {
    StageTask { job_id: "j".into(), spec: spec.clone(), hop, input }
}

fn run(executor: &SleepExecutor, tasks: &[StageTask]) -> Vec<Result<StageOutput, StageError>> {
    executor.run_batch(tasks, &mut |_, _, _| true)
}

fn latent(output: &Result<StageOutput, StageError>) -> WireTensor {
    match output {
        Ok(StageOutput::Latent(t)) => t.clone(),
        other => panic!("expected a latent, got {other:?}"),
    }
}

#[test]
fn parses_profiles() {
    assert_eq!(SleepExecutor::parse_profile("sleep").unwrap().unwrap(), Duration::ZERO);
    assert_eq!(SleepExecutor::parse_profile("sleep:25").unwrap().unwrap(), Duration::from_millis(25));
    assert!(SleepExecutor::parse_profile("sleep:abc").unwrap().is_err());
    assert!(SleepExecutor::parse_profile("tiny").is_none());
    assert!(SleepExecutor::parse_profile("sleepy").is_none());
}

#[test]
fn stages_produce_real_shapes_deterministically() {
    let spec = spec(2);
    let base = SleepExecutor::new(StageKind::Diffusion, Duration::ZERO);
    let z0 = latent(&run(&base, &[task(&spec, 0, StageInput::Text)])[0]);
    assert_eq!(z0.shape, vec![1, 4, 4, 8]);
    let cfm = SleepExecutor::new(StageKind::Cfm, Duration::ZERO);
    let z1 = latent(&run(&cfm, &[task(&spec, 1, StageInput::Latent(z0.clone()))])[0]);
    assert_eq!(z1.shape, vec![1, 4, 8, 16]);
    let z2 = latent(&run(&cfm, &[task(&spec, 2, StageInput::Latent(z1.clone()))])[0]);
    assert_eq!(z2.shape, vec![1, 4, 16, 32]);
    let decoder = SleepExecutor::new(StageKind::Decoder, Duration::ZERO);
    let Ok(StageOutput::Image { png }) = &run(&decoder, &[task(&spec, 0, StageInput::Latent(z2.clone()))])[0] else { panic!() };
    let image = image::load_from_memory(png).unwrap();
    assert_eq!((image.width(), image.height()), (256, 128));
    // Same task, same bytes, alone or in a batch; another seed differs.
    let again = run(&cfm, &[task(&spec, 1, StageInput::Latent(z0.clone())), task(&spec, 1, StageInput::Latent(z0.clone()))]);
    assert_eq!(latent(&again[0]), z1);
    assert_eq!(latent(&again[1]), z1);
    let other = JobSpec { seed: 4, ..spec.clone() };
    assert_ne!(latent(&run(&base, &[task(&other, 0, StageInput::Text)])[0]), z0);
}

#[test]
fn wrong_inputs_are_invalid() {
    let spec = spec(1);
    let cfm = SleepExecutor::new(StageKind::Cfm, Duration::ZERO);
    let wrong = WireTensor::from_f32(vec![1, 4, 3, 3], &[0.0; 36]);
    assert!(matches!(&run(&cfm, &[task(&spec, 1, StageInput::Latent(wrong))])[0], Err(StageError::InvalidInput(m)) if m.contains("4x8")));
    assert!(matches!(&run(&cfm, &[task(&spec, 1, StageInput::Text)])[0], Err(StageError::InvalidInput(_))));
}

#[test]
fn progress_false_cancels_only_that_task() {
    let spec = spec(1);
    let base = SleepExecutor::new(StageKind::Diffusion, Duration::ZERO);
    let tasks = [task(&spec, 0, StageInput::Text), task(&spec, 0, StageInput::Text)];
    let mut seen = Vec::new();
    let results = base.run_batch(&tasks, &mut |index, step, total| {
        seen.push((index, step, total));
        !(index == 0 && step == 2)
    });
    assert_eq!(results[0], Err(StageError::Cancelled));
    assert!(results[1].is_ok());
    assert!(!seen.contains(&(0, 3, 4)), "no step after the cancel: {seen:?}");
    assert!(seen.contains(&(1, 4, 4)));
}

#[test]
fn factory_rejects_other_profiles_and_devices() {
    use clap::Parser;
    let flags = crate::worker::WorkerFlags::try_parse_from(["w", "--profile", "tiny"]).unwrap();
    assert!(executor_factory(StageKind::Cfm, &flags).err().unwrap().to_string().contains("--profile tiny"));
    let flags = crate::worker::WorkerFlags::try_parse_from(["w", "--profile", "sleep", "--device", "cuda:0"]).unwrap();
    assert!(executor_factory(StageKind::Cfm, &flags).err().unwrap().to_string().contains("--device"));
}

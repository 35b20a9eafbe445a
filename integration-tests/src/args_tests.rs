use super::*;

fn args(list: &[&str]) -> Result<Args, clap::Error> {
    Args::try_parse_from(std::iter::once("fmboost-loadtest").chain(list.iter().copied()))
}

#[test]
fn durations_need_a_unit() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("10").unwrap_err().contains("unit"));
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("xs").unwrap_err().contains("not a number"));
}

#[test]
fn workers_name_every_stage_once() {
    let counts = parse_workers("diffusion=1, cfm=2,decoder=0").unwrap();
    assert_eq!((counts.get(StageKind::Diffusion), counts.get(StageKind::Cfm), counts.get(StageKind::Decoder)), (1, 2, 0));
    assert!(parse_workers("diffusion=1,cfm=2").unwrap_err().contains("decoder"));
    assert!(parse_workers("diffusion=1,cfm=2,decoder=1,cfm=3").unwrap_err().contains("twice"));
    assert!(parse_workers("diffusion=1,vae=2,decoder=1").unwrap_err().contains("unknown stage"));
    assert!(parse_workers("diffusion=one,cfm=2,decoder=1").unwrap_err().contains("not a worker count"));
}

#[test]
fn kill_and_restart_specs() {
    assert_eq!(
        parse_kill("cfm:every=10s"),
        Ok(KillSpec { stage: StageKind::Cfm, when: KillWhen::Every(Duration::from_secs(10)) })
    );
    assert_eq!(parse_kill("decoder:at=2s").unwrap().when, KillWhen::At(Duration::from_secs(2)));
    assert!(parse_kill("cfm").is_err());
    assert!(parse_kill("cfm:every=10s,at=1s").unwrap_err().contains("exactly one"));
    assert!(parse_kill("cfm:often=1s").unwrap_err().contains("unknown key"));
    assert!(parse_kill("cfm:every=10ms").unwrap_err().contains("100ms"));
    assert_eq!(parse_restart("at=30s"), Ok(RestartSpec { at: Duration::from_secs(30), down: Duration::from_secs(1) }));
    assert_eq!(parse_restart("at=3s,down=500ms").unwrap().down, Duration::from_millis(500));
    assert!(parse_restart("down=1s").unwrap_err().contains("at=T"));
}

#[test]
fn a_run_needs_a_target_a_bound_and_a_load() {
    assert!(args(&["--jobs", "5", "--rate", "2"]).is_err(), "neither --target nor --local");
    assert!(args(&["--local", "--target", "x:1", "--jobs", "5", "--rate", "2"]).is_err());
    assert!(args(&["--local", "--rate", "2"]).is_err(), "no bound");
    assert!(args(&["--local", "--jobs", "5", "--duration", "5s", "--rate", "2"]).is_err());
    assert!(args(&["--local", "--jobs", "5"]).is_err(), "no load");
    assert!(args(&["--local", "--jobs", "5", "--rate", "2", "--concurrency", "3"]).is_err());
    let parsed = args(&["--local", "--jobs", "5", "--rate", "2.5", "--arrival", "fixed"]).unwrap();
    parsed.check().unwrap();
    assert_eq!(parsed.load().unwrap(), Load::Open { rate: 2.5, kind: ArrivalKind::Fixed });
    assert_eq!(parsed.bound().unwrap(), Bound::Jobs(5));
    let closed = args(&["--target", "127.0.0.1:50051", "--duration", "10s", "--concurrency", "8"]).unwrap();
    assert_eq!(closed.load().unwrap(), Load::Closed { concurrency: 8 });
    assert_eq!(closed.bound().unwrap(), Bound::Duration(Duration::from_secs(10)));
}

#[test]
fn local_cluster_flags_need_local() {
    for flag in [["--kill", "cfm:every=5s"], ["--worker-profile", "sleep:5"], ["--max-batch", "4"], ["--workers", "diffusion=1,cfm=1,decoder=1"]] {
        let err = args(&["--target", "h:1", "--jobs", "5", "--rate", "1", flag[0], flag[1]]).unwrap_err().to_string();
        assert!(err.contains(flag[0]) && err.contains("--target"), "{flag:?}: {err}");
    }
    args(&["--local", "--jobs", "5", "--rate", "1", "--max-batch", "4", "--kill", "cfm:every=5s"]).unwrap();
}

#[test]
fn checks_reject_bad_values_naming_the_flag() {
    let err = |list: &[&str]| args(list).unwrap().check().unwrap_err().to_string();
    assert!(err(&["--local", "--jobs", "5", "--rate", "0"]).contains("--rate"));
    assert!(err(&["--local", "--jobs", "0", "--rate", "1"]).contains("--jobs"));
    assert!(err(&["--local", "--jobs", "5", "--concurrency", "0"]).contains("--concurrency"));
    assert!(err(&["--local", "--workers", "diffusion=1,cfm=0,decoder=1", "--jobs", "5", "--rate", "1", "--kill", "cfm:at=1s"])
        .contains("no cfm worker"));
    assert!(err(&["--local", "--jobs", "5", "--rate", "1", "--connections", "0"]).contains("--connections"));
}

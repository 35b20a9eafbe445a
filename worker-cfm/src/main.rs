//! `fmboost-worker-cfm`: the cfm stage worker. All behaviour lives in `fmboost_core::worker`;
//! the executor factory decides what computes the stage.
use clap::Parser;
use fmboost_core::stage::StageKind;
use fmboost_core::worker::{run_worker, WorkerFlags};

fn main() -> anyhow::Result<()> {
    run_worker(StageKind::Cfm, WorkerFlags::parse(), fmboost_core::sleep::executor_factory)
}

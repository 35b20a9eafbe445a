//! `fmboost-worker-decoder`: the decoder stage worker. All behaviour lives in `fmboost_core::worker`;
//! the executor factory decides what computes the stage.
use clap::Parser;
use fmboost_core::stage::StageKind;
use fmboost_core::worker::{run_worker, WorkerFlags};

fn main() -> anyhow::Result<()> {
    run_worker(StageKind::Decoder, WorkerFlags::parse(), fmboost_core::sleep::executor_factory)
}

//! `fmboost-loadtest`: see the crate docs and docs/loadtest.md. Exit status: 0 when the run
//! is clean, 1 when it lost jobs, mismatched checksums, duplicated jobs, saw a crash or got no
//! job admitted at all, 2 when the harness itself failed (bad flags, a cluster that would not
//! start, an interruption).

use std::process::ExitCode;

use clap::Parser;
use fmboost_loadtest::args::Args;
use fmboost_loadtest::{run, write_report};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let args = Args::parse();
    let report_path = args.report.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fmboost-loadtest: starting the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(args) => result,
            signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
        }
    });
    // Dropping the runtime drops every task, and with them the local cluster's processes.
    drop(runtime);
    let report = match result {
        Ok(report) => report,
        Err(err) => {
            eprintln!("fmboost-loadtest: {err:#}");
            return ExitCode::from(2);
        }
    };
    println!("{}", report.markdown());
    if let Some(path) = report_path {
        if let Err(err) = write_report(&report, &path) {
            eprintln!("fmboost-loadtest: {err:#}");
            return ExitCode::from(2);
        }
    }
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            eprintln!("fmboost-loadtest: cannot listen for SIGTERM: {err}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

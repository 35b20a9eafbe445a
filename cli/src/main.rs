//! `fmboost`: the client of the cluster, the in-process runner on the embedded default, the
//! trainer, the golden checks and the benchmarks. Each command lives in its own module; this
//! file only dispatches.

mod client;
mod golden;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fmboost", version, about = "High-resolution image synthesis with latent diffusion + coupling flow matching")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run reference-vector files (shared/golden format) and compare against our models.
    CheckGolden(golden::Args),
    /// Submit a job to the cluster (optionally following it and downloading the PNG).
    Submit(Box<client::SubmitArgs>),
    /// Follow a job's progress until it finishes.
    Watch(client::JobArgs),
    /// Download a finished job's PNG (and final latent).
    Result(client::ResultArgs),
    /// Cancel a job.
    Cancel(client::JobArgs),
    /// The cluster's status, or a job's.
    Status(client::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckGolden(args) => golden::run(args),
        Command::Submit(args) => client::submit(*args),
        Command::Watch(args) => client::watch(args),
        Command::Result(args) => client::result(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Status(args) => client::status(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

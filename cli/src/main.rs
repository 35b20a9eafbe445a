//! `fmboost`: the client of the cluster, the in-process runner on the embedded default, the
//! trainer, the golden checks and the benchmarks. Each command lives in its own module; this
//! file only dispatches.

mod client;
mod bench;
mod eval;
mod golden;
mod job_args;
mod local;
mod tokenize;
mod train;

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
    /// Run a job in this process (no Redis, no network) on the embedded `tiny` profile by default.
    Generate(local::GenerateArgs),
    /// Upscale an image 2× or 4× in this process: encode, CFM hops, decode.
    Upscale(local::UpscaleArgs),
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
    /// Evaluate upscaling (PSNR/SSIM) on photo crops.
    Eval(eval::Args),
    /// Train the autoencoder, a CFM hop or the base generator on a folder of photos.
    Train(train::Args),
    /// The token ids an SD directory's text encoder sees for each prompt (compare with transformers).
    Tokenize(tokenize::Args),
    /// Micro-benchmarks; each prints one JSON line.
    #[command(subcommand)]
    Bench(bench::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckGolden(args) => golden::run(args),
        Command::Generate(args) => local::generate(args),
        Command::Upscale(args) => local::upscale(args),
        Command::Submit(args) => client::submit(*args),
        Command::Watch(args) => client::watch(args),
        Command::Result(args) => client::result(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Status(args) => client::status(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Eval(args) => eval::run(args).map(|()| ExitCode::SUCCESS),
        Command::Train(args) => train::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

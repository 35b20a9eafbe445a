//! `fmboost bench ...`: micro-benchmarks that print one JSON line each.

pub mod cfm;
pub mod decode;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Seconds per network evaluation of the CFM UNet with random weights.
    Cfm(cfm::Args),
    /// Seconds and peak RSS of decoding a latent with the SD 1.5 VAE (random weights), tiled
    /// and, where it fits in memory, untiled.
    Decode(decode::Args),
}

pub fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Cfm(args) => cfm::run(args),
        Command::Decode(args) => decode::run(args),
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` of /proc/self/status).
pub fn peak_rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| anyhow::anyhow!("peak RSS: reading /proc/self/status: {e} (Linux only)"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow::anyhow!("peak RSS: no VmHWM line in /proc/self/status"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("peak RSS: `{line}`: {e}"))?;
    Ok(kib * 1024)
}

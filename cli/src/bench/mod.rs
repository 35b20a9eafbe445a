//! `fmboost bench ...`: micro-benchmarks that print one JSON line each.

pub mod cfm;
pub mod chain;
pub mod decode;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Seconds per network evaluation of the CFM UNet with random weights.
    Cfm(cfm::Args),
    /// Seconds per stage and per image of the whole 1024² (or 2048²) chain on SD 1.5's
    /// architectures with random weights: text encoder, UNet (DDIM with guidance; LCM), CFM
    /// hop(s), VAE decode.
    Chain(chain::Args),
    /// Seconds and peak RSS of decoding a latent with the SD 1.5 VAE (random weights), tiled
    /// and, where it fits in memory, untiled.
    Decode(decode::Args),
}

pub fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Cfm(args) => cfm::run(args),
        Command::Chain(args) => chain::run(args),
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

/// CPU time (user + system, all threads) this process has used so far, in seconds.
pub fn process_cpu_seconds() -> anyhow::Result<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        anyhow::bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// The 1-minute load average (other work on the machine skews wall-clock timings).
pub fn load_average_1m() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").map_err(|e| anyhow::anyhow!("reading /proc/loadavg: {e}"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/loadavg: unexpected content `{text}`"))
}

//! The JSONL loss log: one JSON object per optimizer step.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::trainer::StepReport;

/// Appends one line per step to a file (created when missing; a resumed run appends).
pub struct LossLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl LossLog {
    /// Opens `path` for a fresh run (truncated) or, with `resumed_at = Some(k)`, for a run
    /// resumed at step `k`: lines of steps after `k` (written after the checkpoint the run
    /// resumes from) are dropped, so every step appears once.
    pub fn open(path: &Path, resumed_at: Option<u64>) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let kept = match resumed_at {
            Some(step) if path.exists() => std::fs::read_to_string(path)?
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
            _ => String::new(),
        };
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(kept.as_bytes())?;
        out.flush()?;
        Ok(Self { path: path.to_owned(), out })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes and flushes one line, so a killed run loses nothing it reported.
    pub fn record(&mut self, r: &StepReport) -> std::io::Result<()> {
        let line = serde_json::json!({
            "step": r.step,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "elapsed_s": r.elapsed_s,
        });
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_step_and_a_resume_drops_steps_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/loss.jsonl");
        let report = |step| StepReport { step, total: 3, loss: 0.5, lr: 1e-4, grad_norm: 2.0, elapsed_s: 0.25 };
        let mut log = LossLog::open(&path, None).unwrap();
        for step in 1..=4 {
            log.record(&report(step)).unwrap();
        }
        // The checkpoint was at step 2; steps 3 and 4 are redone.
        let mut log = LossLog::open(&path, Some(2)).unwrap();
        log.record(&report(3)).unwrap();
        let steps = |p: &Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(steps(&path), vec![1, 2, 3]);
        LossLog::open(&path, None).unwrap();
        assert!(steps(&path).is_empty());
    }
}

//! The JSONL loss log: one JSON object per optimizer step.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::trainer::StepReport;

/// Appends one line per step to a file (created when missing; a resumed run appends).
pub struct LossLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl LossLog {
    /// Opens `path`; `append` keeps earlier lines (resuming), otherwise the file is truncated.
    pub fn open(path: &Path, append: bool) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(path)?;
        Ok(Self { path: path.to_owned(), out: BufWriter::new(file) })
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
    fn writes_one_json_object_per_line_and_appends_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/loss.jsonl");
        let report = |step| StepReport { step, total: 3, loss: 0.5, lr: 1e-4, grad_norm: 2.0, elapsed_s: 0.25 };
        LossLog::open(&path, false).unwrap().record(&report(1)).unwrap();
        LossLog::open(&path, true).unwrap().record(&report(2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> =
            text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![1, 2]);
        LossLog::open(&path, false).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().is_empty());
    }
}

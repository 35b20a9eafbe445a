//! Child processes that cannot outlive the harness.
//!
//! Every child is started from one long-lived spawner thread with `PR_SET_PDEATHSIG = SIGKILL`:
//! the kernel kills it when that thread ends, which happens when the harness exits in any way
//! (even SIGKILL). On an ordinary exit, [`Managed`]'s `Drop` kills and reaps it first.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread children are started from (see the module docs).
pub struct Spawner {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    pub fn start() -> anyhow::Result<Self> {
        let (requests, receiver) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("loadtest-spawner".into())
            .spawn(move || {
                for (mut command, reply) in receiver {
                    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    // The receiver only goes away if the caller gave up waiting.
                    let _ = reply.send(command.spawn());
                }
            })
            .context("starting the spawner thread")?;
        Ok(Spawner { requests: Some(requests), thread: Some(thread) })
    }

    /// Starts `program args…` with stdout and stderr appended to `log`.
    pub fn spawn(&self, name: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<Managed> {
        let out = File::options().create(true).append(true).open(log).with_context(|| format!("creating log {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log handle")?;
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let (reply, answer) = mpsc::channel();
        self.requests.as_ref().expect("spawner running").send((command, reply)).map_err(|_| anyhow!("the spawner thread died"))?;
        let child = answer
            .recv()
            .map_err(|_| anyhow!("the spawner thread died"))?
            .with_context(|| format!("starting {name}: {}", program.display()))?;
        Ok(Managed { name: name.to_string(), child: Some(child), log: log.to_path_buf(), killed_by_us: false })
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running child with its log file.
pub struct Managed {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    killed_by_us: bool,
}

impl Managed {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if it has exited (reaped), without waiting.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().with_context(|| format!("checking on {}", self.name)),
            None => Ok(None),
        }
    }

    /// True if it exited although the harness never stopped it.
    pub fn died_unexpectedly(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.killed_by_us {
            return Ok(None);
        }
        self.exited()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.killed_by_us = true;
        if let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_none() {
                child.kill().with_context(|| format!("killing {}", self.name))?;
            }
            child.wait().with_context(|| format!("reaping {}", self.name))?;
        }
        Ok(())
    }

    /// SIGTERM (a graceful drain), then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        self.killed_by_us = true;
        let Some(pid) = self.pid() else { return Ok(()) };
        if self.exited()?.is_none() {
            // SAFETY: plain kill(2) on our own, not yet reaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while self.exited()?.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.kill()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 2000)
    }

    /// Its log's head and tail, for error messages: a failing binary states the error first
    /// (`Error: …`) and may follow it with a long backtrace when `RUST_BACKTRACE` is set.
    pub fn log_excerpt(&self) -> String {
        log_excerpt(&self.log, 2000)
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Err(err) = self.kill() {
            eprintln!("fmboost-loadtest: {err:#}");
        }
    }
}

/// The last `bytes` of a file (lossy UTF-8), or why it cannot be read.
pub fn log_tail(path: &Path, bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// The first and last `bytes` of a file (all of it when short), or why it cannot be read.
pub fn log_excerpt(path: &Path, bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let text = std::fs::read(path)?;
        let len = text.len() as u64;
        if len <= 2 * bytes {
            return Ok(String::from_utf8_lossy(&text).into_owned());
        }
        let (head, tail) = (&text[..bytes as usize], &text[(len - bytes) as usize..]);
        Ok(format!(
            "{}\n[… {} bytes left out …]\n{}",
            String::from_utf8_lossy(head),
            len - 2 * bytes,
            String::from_utf8_lossy(tail)
        ))
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_logged_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let spawner = Spawner::start().unwrap();
        let log = dir.path().join("sh.log");
        let mut child = spawner.spawn("sh", Path::new("/bin/sh"), &["-c".into(), "echo hello; exec sleep 30".into()], &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !child.log_tail().contains("hello") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(child.log_tail().contains("hello"));
        assert!(child.died_unexpectedly().unwrap().is_none());
        child.kill().unwrap();
        assert!(child.died_unexpectedly().unwrap().is_none(), "killed by us is not unexpected");

        let mut quits = spawner.spawn("false", Path::new("/bin/sh"), &["-c".into(), "exit 3".into()], &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = quits.died_unexpectedly().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(3));
        let err = spawner.spawn("missing", Path::new("/nonexistent/bin"), &[], &log).err().unwrap();
        assert!(format!("{err:#}").contains("/nonexistent/bin"));
    }

    #[test]
    fn the_excerpt_keeps_the_error_at_the_head_of_a_long_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("long.log");
        let backtrace: String = (0..500).map(|i| format!("  {i}: some::frame\n")).collect();
        std::fs::write(&log, format!("Error: --listen 127.0.0.1:1: cannot bind\n{backtrace}the end\n")).unwrap();
        let excerpt = log_excerpt(&log, 200);
        assert!(excerpt.starts_with("Error: --listen"), "{excerpt}");
        assert!(excerpt.ends_with("the end\n") && excerpt.contains("bytes left out"), "{excerpt}");
        assert!(excerpt.len() < 600);
        std::fs::write(&log, "short\n").unwrap();
        assert_eq!(log_excerpt(&log, 200), "short\n");
        assert!(log_excerpt(&dir.path().join("none"), 200).contains("cannot read"));
    }
}

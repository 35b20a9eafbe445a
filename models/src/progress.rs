//! Per-step progress reporting with cooperative cancellation.
//!
//! Long loops (solver steps, scheduler steps, decode tiles) call the caller's callback after
//! every step; the callback answers whether to go on. A stop surfaces as [`RunError::Cancelled`]
//! so callers can tell a cancellation from a failure.

/// One finished step of a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// 1-based index of the step just finished.
    pub step: usize,
    /// Steps in the loop.
    pub total: usize,
}

/// The callback's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// A progress callback. `&mut dyn FnMut(Step) -> Flow` so loops need no generics.
pub type Progress<'a> = &'a mut dyn FnMut(Step) -> Flow;

/// A callback that never stops and reports nothing.
pub fn ignore(_: Step) -> Flow {
    Flow::Continue
}

/// The error of a loop that can be stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cancelled after step {step} of {total}")]
    Cancelled { step: usize, total: usize },
    /// The request itself is wrong (a size, a step count, a prompt); the message names it.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl RunError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RunError::Cancelled { .. })
    }
}

/// Reports `step` and turns a stop into [`RunError::Cancelled`].
pub fn report(progress: &mut dyn FnMut(Step) -> Flow, step: usize, total: usize) -> Result<(), RunError> {
    match progress(Step { step, total }) {
        Flow::Continue => Ok(()),
        Flow::Stop => Err(RunError::Cancelled { step, total }),
    }
}

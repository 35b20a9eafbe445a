//! The trainer (issue D).

//! Joins `models` and `core`: model profiles, the pipeline stages on real models (used by the
//! worker pools and by `fmboost generate`), and pixels in and out.

pub mod capabilities;
pub mod executor;
pub mod files;
pub mod local;
pub mod picture;
pub mod profile;
pub mod registry;
pub mod stack;

//! Joins `models` and `core`: model profiles, the pipeline stages on real models (used by the
//! workers and by `fmboost generate`), and pixels in and out.

pub mod picture;

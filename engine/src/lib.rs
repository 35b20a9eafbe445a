//! Joins models and core: model profiles and the pipeline stages (used by workers and `fmboost generate`).

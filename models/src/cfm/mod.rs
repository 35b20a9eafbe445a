//! The paper's Coupling Flow Matching UNet, checkpoint loading, sampler and solvers (issue A).

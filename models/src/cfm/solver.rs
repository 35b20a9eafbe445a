//! Fixed-step ODE solvers on the grid linspace(0, 1, steps + 1), step for step as torchdiffeq
//! computes them (its `rk4` is the 3/8 rule; `heun2` is the explicit trapezoid).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::progress::{report, Flow, RunError, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    Euler,
    Midpoint,
    Heun2,
    Rk4,
}

impl Solver {
    /// Velocity evaluations per step.
    pub fn evals_per_step(self) -> usize {
        match self {
            Self::Euler => 1,
            Self::Midpoint | Self::Heun2 => 2,
            Self::Rk4 => 4,
        }
    }

    /// Network evaluations for `steps` steps.
    pub fn nfe(self, steps: usize) -> usize {
        self.evals_per_step() * steps
    }
}

impl std::str::FromStr for Solver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "euler" => Ok(Self::Euler),
            "midpoint" => Ok(Self::Midpoint),
            "heun2" => Ok(Self::Heun2),
            "rk4" => Ok(Self::Rk4),
            other => Err(format!("solver `{other}`: expected `euler`, `midpoint`, `heun2` or `rk4`")),
        }
    }
}

impl std::fmt::Display for Solver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Euler => "euler",
            Self::Midpoint => "midpoint",
            Self::Heun2 => "heun2",
            Self::Rk4 => "rk4",
        })
    }
}

/// The time grid: linspace(0, 1, steps + 1) computed like torch.linspace in f32 (the
/// reference passes an f32 grid to torchdiffeq).
pub fn time_grid(steps: usize) -> Vec<f32> {
    let n = steps + 1;
    let step = 1.0f32 / steps as f32;
    // torch.linspace fills the first half from the start and the second half from the end.
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { i as f32 * step } else { 1.0 - (n - 1 - i) as f32 * step })
        .collect()
}

/// Integrates dx/dt = velocity(x, t) from t = 0 to 1 in `steps` steps; reports progress after
/// every step and stops when the callback says so. Returns x(1) and the number of evaluations.
pub fn integrate(
    solver: Solver,
    steps: usize,
    x0: &Tensor,
    velocity: &mut dyn FnMut(&Tensor, f32) -> candle_core::Result<Tensor>,
    progress: &mut dyn FnMut(Step) -> Flow,
) -> Result<(Tensor, usize), RunError> {
    if steps == 0 {
        return Err(candle_core::Error::msg("solver steps must be > 0").into());
    }
    let grid = time_grid(steps);
    let mut x = x0.clone();
    let mut nfe = 0;
    let mut f = |x: &Tensor, t: f32| {
        nfe += 1;
        velocity(x, t)
    };
    for (i, pair) in grid.windows(2).enumerate() {
        let (t0, t1) = (pair[0], pair[1]);
        let dt = t1 - t0;
        let dt64 = dt as f64;
        let dx = match solver {
            Solver::Euler => (f(&x, t0)? * dt64)?,
            Solver::Midpoint => {
                let k1 = f(&x, t0)?;
                let mid = (&x + (k1 * (0.5 * dt64))?)?;
                (f(&mid, t0 + 0.5 * dt)? * dt64)?
            }
            Solver::Heun2 => {
                let k1 = f(&x, t0)?;
                let k2 = f(&(&x + (&k1 * dt64)?)?, t1)?;
                ((k1 + k2)? * (0.5 * dt64))?
            }
            Solver::Rk4 => {
                // torchdiffeq's rk4_alt_step_func: the 3/8 rule, last stage at t1.
                let third = 1.0 / 3.0;
                let k1 = f(&x, t0)?;
                let k2 = f(&(&x + (&k1 * (dt64 * third))?)?, t0 + dt * third as f32)?;
                let k3 = f(&(&x + ((&k2 - (&k1 * third)?)? * dt64)?)?, t0 + dt * (2.0 * third) as f32)?;
                let k4 = f(&(&x + (((&k1 - &k2)? + &k3)? * dt64)?)?, t1)?;
                ((((k2 + k3)? * 3.0)? + k1)? + k4)?.affine(dt64 * 0.125, 0.0)?
            }
        };
        x = (x + dx)?;
        report(progress, i + 1, steps)?;
    }
    Ok((x, nfe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(solver: Solver, steps: usize) -> f64 {
        // dx/dt = 2x → x(1) = e² (autonomous, so the f32 time grid's rounding plays no part)
        let x0 = Tensor::new(&[1f64], &Device::Cpu).unwrap();
        let mut v = |x: &Tensor, _: f32| x * 2.0;
        let (x, nfe) = integrate(solver, steps, &x0, &mut v, &mut crate::progress::ignore).unwrap();
        assert_eq!(nfe, solver.nfe(steps));
        (x.to_vec1::<f64>().unwrap()[0] - 2f64.exp()).abs()
    }

    #[test]
    fn solvers_converge_at_their_order() {
        for (solver, order) in [(Solver::Euler, 1.0), (Solver::Midpoint, 2.0), (Solver::Heun2, 2.0), (Solver::Rk4, 4.0)] {
            let (coarse, fine) = (run(solver, 16), run(solver, 32));
            let observed = (coarse / fine).log2();
            assert!((observed - order).abs() < 0.35, "{solver}: observed order {observed}");
        }
    }

    #[test]
    fn grid_is_linspace_with_exact_ends() {
        let g = time_grid(40);
        assert_eq!(g.len(), 41);
        assert_eq!((g[0], g[40]), (0.0, 1.0));
        assert!((g[20] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn stop_surfaces_as_cancelled() {
        let x0 = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let mut v = |x: &Tensor, _: f32| Ok(x.clone());
        let mut stop_after_two = |s: Step| if s.step == 2 { Flow::Stop } else { Flow::Continue };
        let err = integrate(Solver::Euler, 5, &x0, &mut v, &mut stop_after_two).unwrap_err();
        assert!(matches!(err, RunError::Cancelled { step: 2, total: 5 }), "{err}");
    }
}

//! Open-loop arrival schedules: the intended send time of every job, fixed before the run, so a
//! slow server delays the sends but not the clock latency is measured from.

use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};

use crate::args::ArrivalKind;

/// Intended send offsets from the start of the run, in increasing order (endless).
pub struct Schedule {
    kind: ArrivalKind,
    rate: f64,
    rng: ChaCha8Rng,
    exp: Exp<f64>,
    next_secs: f64,
    index: u64,
}

impl Schedule {
    /// `rate` jobs per second (positive, finite); `seed` makes Poisson schedules reproducible.
    pub fn new(kind: ArrivalKind, rate: f64, seed: u64) -> Self {
        assert!(rate.is_finite() && rate > 0.0, "rate checked by Args::load");
        Schedule {
            kind,
            rate,
            rng: ChaCha8Rng::seed_from_u64(seed),
            exp: Exp::new(rate).expect("positive rate"),
            next_secs: 0.0,
            index: 0,
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // The first job goes at 0; later ones after an interval (fixed: computed from the index,
        // so rounding never accumulates).
        let at = match self.kind {
            ArrivalKind::Fixed => self.index as f64 / self.rate,
            ArrivalKind::Poisson => {
                let at = self.next_secs;
                self.next_secs += self.exp.sample(&mut self.rng);
                at
            }
        };
        self.index += 1;
        Some(Duration::from_secs_f64(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_intervals_are_one_over_rate() {
        let offsets: Vec<Duration> = Schedule::new(ArrivalKind::Fixed, 4.0, 0).take(5).collect();
        let expected: Vec<Duration> = [0, 250, 500, 750, 1000].iter().map(|&ms| Duration::from_millis(ms)).collect();
        assert_eq!(offsets, expected);
    }

    #[test]
    fn poisson_is_increasing_reproducible_and_has_the_asked_rate() {
        let a: Vec<Duration> = Schedule::new(ArrivalKind::Poisson, 50.0, 7).take(20_000).collect();
        let b: Vec<Duration> = Schedule::new(ArrivalKind::Poisson, 50.0, 7).take(20_000).collect();
        assert_eq!(a, b);
        assert_ne!(a, Schedule::new(ArrivalKind::Poisson, 50.0, 8).take(20_000).collect::<Vec<_>>());
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // 20,000 exponential gaps of mean 20 ms: the mean is within 3% with overwhelming odds.
        let mean_gap = a.last().unwrap().as_secs_f64() / (a.len() - 1) as f64;
        assert!((mean_gap - 0.02).abs() < 0.0006, "mean gap {mean_gap}");
        // Gaps vary (not a fixed schedule in disguise).
        let gaps: Vec<f64> = a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        assert!(gaps.iter().any(|&g| g < 0.005) && gaps.iter().any(|&g| g > 0.05));
    }
}

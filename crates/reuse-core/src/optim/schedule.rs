//! Learning-rate schedules, as transformers' `get_*_schedule_with_warmup`.

/// Learning-rate schedules, as a multiplier of the base rate by step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Schedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Linear warmup from 0, then linear decay to 0 at the last step
    /// (`get_linear_schedule_with_warmup`).
    Linear {
        /// Warmup steps.
        warmup: usize,
    },
    /// Linear warmup, then half a cosine to 0 (`get_cosine_schedule_with_warmup`).
    Cosine {
        /// Warmup steps.
        warmup: usize,
    },
}

impl Schedule {
    /// The multiplier at `step` (0-based) of `total` steps.
    pub fn factor(self, step: usize, total: usize) -> f64 {
        let warm = |w: usize| (w > 0 && step < w).then(|| step as f64 / w as f64);
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear { warmup } => warm(warmup).unwrap_or_else(|| {
                ((total - step.min(total)) as f64 / (total - warmup.min(total)).max(1) as f64)
                    .max(0.0)
            }),
            Schedule::Cosine { warmup } => warm(warmup).unwrap_or_else(|| {
                let p =
                    (step - warmup.min(step)) as f64 / (total - warmup.min(total)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_and_decay() {
        let l = Schedule::Linear { warmup: 10 };
        assert_eq!(l.factor(0, 100), 0.0);
        assert!((l.factor(5, 100) - 0.5).abs() < 1e-12);
        assert!((l.factor(10, 100) - 1.0).abs() < 1e-12);
        assert!((l.factor(55, 100) - 0.5).abs() < 1e-12);
        let c = Schedule::Cosine { warmup: 0 };
        assert!((c.factor(0, 100) - 1.0).abs() < 1e-12);
        assert!((c.factor(50, 100) - 0.5).abs() < 1e-12);
        assert!(c.factor(100, 100).abs() < 1e-12);
    }
}

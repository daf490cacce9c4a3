//! Logical time. The simulation never reads a real clock: the scheduler advances one
//! global clock (Postgres's, in milliseconds), and each node reads its own local clock,
//! which runs at a rate of its own, so timers measured on two nodes disagree the way
//! monotonic clocks on two machines do.

/// Milliseconds of logical time.
pub type Millis = u64;

/// A node's monotonic clock: continuous, never stepping backwards, running at
/// `rate_permille / 1000` of the global clock. A rate change re-anchors it, so the
/// local reading stays continuous across the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalClock {
    base_global: Millis,
    base_local: Millis,
    rate_permille: u64,
}

impl LocalClock {
    /// A clock reading `offset` at global time zero.
    pub fn new(offset: Millis, rate_permille: u64) -> Self {
        Self {
            base_global: 0,
            base_local: offset,
            rate_permille: rate_permille.max(1),
        }
    }

    /// The local reading at global time `now`.
    pub fn at(&self, now: Millis) -> Millis {
        self.base_local + now.saturating_sub(self.base_global) * self.rate_permille / 1000
    }

    /// From global time `now` on, runs at `rate_permille`.
    pub fn set_rate(&mut self, now: Millis, rate_permille: u64) {
        self.base_local = self.at(now);
        self.base_global = now;
        self.rate_permille = rate_permille.max(1);
    }

    pub fn rate_permille(&self) -> u64 {
        self.rate_permille
    }

    /// How long `local` milliseconds on this clock last in global time (rounded up).
    pub fn to_global(&self, local: Millis) -> Millis {
        (local * 1000).div_ceil(self.rate_permille)
    }

    /// How long `global` milliseconds last on this clock.
    pub fn to_local(&self, global: Millis) -> Millis {
        global * self.rate_permille / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_change_keeps_the_reading_continuous() {
        let mut c = LocalClock::new(7, 1100);
        assert_eq!(c.at(1000), 1107);
        c.set_rate(1000, 900);
        assert_eq!(c.at(1000), 1107);
        assert_eq!(c.at(2000), 2007);
    }
}

//! The faults a run interleaves with the nodes' steps: a node crashes (and restarts
//! later as a new process), freezes for a while (the server ends its idle session if
//! the pause outlasts `idle_session_timeout`), loses its session to the server, or its
//! clock changes rate; the bus starts or stops losing wake-ups.

use rand::Rng as _;
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::time::Millis;

/// One fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Node `0` dies; it restarts after `1` ms.
    Crash(usize, Millis),
    /// Node `0` freezes for `1` ms.
    Pause(usize, Millis),
    /// The server ends node `0`'s lock session (a terminated backend, a cut socket).
    KillSession(usize),
    /// Node `0`'s clock runs at `1` per mille from now on.
    Skew(usize, u64),
    /// The bus loses wake-ups (or stops losing them).
    LossyBus(bool),
}

/// Draws a fault for a cluster of `cfg.nodes` nodes.
pub fn draw(rng: &mut ChaCha8Rng, cfg: &Config) -> Fault {
    let node = rng.random_range(0..cfg.nodes);
    let idle = cfg.timers.idle_timeout;
    match rng.random_range(0..100) {
        0..20 => Fault::Crash(node, rng.random_range(50..=1_500)),
        // Short pauses the session survives, and long ones it does not.
        20..50 => Fault::Pause(node, rng.random_range(20..=idle * 3)),
        50..70 => Fault::KillSession(node),
        70..85 => Fault::Skew(
            node,
            rng.random_range(cfg.skew_permille.0..=cfg.skew_permille.1),
        ),
        _ => Fault::LossyBus(rng.random_bool(0.5)),
    }
}

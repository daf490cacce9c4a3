//! The conformance test's shared half: the operations it generates, the model's
//! answers to them, and how two answers and two states are compared. The real half
//! (`Store` and dedicated lock sessions on Postgres) is [`real`].
//!
//! Both sides get the same seeded sequence of claims, mints, fenced appends, crash
//! records, releases, API commands, lock calls and sessions dying; after each step
//! their answers (accepted, with the generation, epoch, version or crash outcome it
//! produced, or refused) and the resulting heads and partition rows must match. The
//! model states the intended semantics, so a mismatch is a place where the real
//! store's conditional statements differ from them. Each side's accepted writes also
//! go through its own history oracle ([`crate::model::History`]).
//!
//! Layout:
//! - [`step`]: the operations and answers;
//! - [`generate`]: the seeded generator, steered by the model's state;
//! - [`model_side`]: the model's answers;
//! - [`real`]: Postgres's answers;
//! - [`runner`]: both, step by step, until the end or the first mismatch.

pub mod generate;
pub mod model_side;
pub mod real;
pub mod runner;
pub mod step;

pub use runner::{Mismatch, Report, conform};

//! TRAK-style attribution: the objective whose gradient is taken, the gradient
//! computation over the LM and the codec decoder, and the random projection.

pub mod gradient;
pub mod objective;
pub mod projector;
pub mod record;
pub mod score;

pub use gradient::{embed, embed_prepared, for_each_gradient, gradient_dim, Timings};
pub use objective::{
    prepare_batch, AudioInput, AudioNllObjective, Example, GenerationObjective, Objective, ObjectiveKind, Prepared,
};
pub use projector::{ProjectorKind, ProjectorSpec};

//! Training datasets: the walk over audio files and their JSON descriptions.

pub mod walker;

pub use walker::{walk, Dataset, TrainingExample};

//! MusicGen on Candle: loading (audiocraft and transformers layouts, offline), the
//! T5 / LM / EnCodec parts, and generation.

pub mod attention;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod conv;
pub mod gemv;
pub mod lm;
pub mod loader;
pub mod loss;
pub mod lstm;
pub mod matmul;
pub mod model;
pub mod ops;
pub mod params;
pub mod pattern;
pub mod pickle_scan;
pub mod sampling;
pub mod t5;
pub mod tiny;

pub use config::MusicgenConfig;
pub use loader::{load, LoadOptions, Purpose};
pub use model::{GenerateOptions, Generation, MusicGen};

//! What spintrak writes to disk.

pub mod embedding_file;
pub mod index;
pub mod merge;
pub mod run_state;

pub use embedding_file::{EmbeddingFile, Header, Record};

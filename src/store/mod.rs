//! What spintrak writes to disk.

pub mod embedding_file;

pub use embedding_file::{EmbeddingFile, Header, Record};

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

/// Runs `work` on a thread of the current rayon pool (in place when already on one), and
/// waits for it.
///
/// Why: a parallel loop started from a thread outside the pool is handed to the pool
/// while the caller sleeps until the loop ends, so every loop wakes a worker and then the
/// caller; started on a pool thread, that thread takes the first share itself. A decoding
/// step starts about 200 small loops (one per weight matrix), a gradient step thousands
/// of matrix products. Measured on 2 cores at musicgen-small shape (alternated runs):
/// generation 85–87% of the weight-read bound against 78–81%, the 2 s `audio-nll`
/// gradient 2.02 s against 2.34 s (medians of 12). Results are unchanged: no loop's
/// numbers depend on which threads run it. Allocations then come from a pool thread,
/// which glibc serves from an arena of its own unless told otherwise: the CLI keeps one
/// (`cli::app::tune_allocator`), without which large blocks were faulted in again.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        assert_eq!(rayon::current_thread_index(), None, "the test itself runs outside the pool");
        assert!(super::on_pool(rayon::current_thread_index).is_some());
        // Already on the pool: in place.
        let (outer, inner) =
            super::on_pool(|| (rayon::current_thread_index(), super::on_pool(rayon::current_thread_index)));
        assert_eq!(outer, inner);
    }
}

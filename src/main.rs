fn main() -> std::process::ExitCode {
    tune_allocator();
    tune_threads();
    spintrak::cli::app::main_with(std::env::args_os().collect())
}

/// By default glibc serves each large block (a weight's gradient, a layer's
/// activations, a convolution's unfolded input) from a fresh `mmap` and unmaps it on
/// free, so every backward pass faults in and zeroes gigabytes of new pages (page
/// clearing was 13% of a profiled gradient step). Served from the heap and never
/// trimmed, freed blocks are reused by the next example instead: the process keeps
/// its peak (an embedding run repeats the same peak per example). Trimming above 1 GB
/// still made each gradient fault its kept activations in again: the audio-nll step at
/// musicgen-small shape took 3.05 s against 2.79 s untrimmed (medians of 10, alternated).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Candle's element-wise ops run on its own pool, whose worker spins 25,000 times after
/// each op before it sleeps; matrix products run on rayon's threads. On a machine with as
/// many cores as threads, the spinning worker took a core from every matrix product that
/// followed an element-wise op (7% of a profiled gradient step). Spinning 1,000 times:
/// the audio-nll step at musicgen-small shape took 2.61 s against 2.99 s, the guided
/// one 4.62 s against 5.11 s (medians of 9, alternated runs). A value the user set wins.
fn tune_threads() {
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        // Before any thread is started: nothing else reads the environment concurrently.
        std::env::set_var(SPIN, "1000");
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
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

fn main() -> std::process::ExitCode {
    tune_allocator();
    spintrak::cli::app::main_with(std::env::args_os().collect())
}

/// By default glibc serves each large block (a weight's gradient, a layer's
/// activations, a convolution's unfolded input) from a fresh `mmap` and unmaps it on
/// free, so every backward pass faults in and zeroes gigabytes of new pages (page
/// clearing was 13% of a profiled gradient step). Served from the heap, without
/// trimming below 1 GB, freed blocks are reused instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

//! What this process and this machine hold in memory (Linux `/proc` and cgroup files):
//! for refusing a model that cannot fit before reading it, and for the benchmarks.

/// Bytes this process could still allocate without swapping: the kernel's
/// `MemAvailable`, or less when a cgroup (a container, a cluster job) sets a lower limit.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut best = kib_field(&meminfo, "MemAvailable:")?;
    let cgroup = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok()?.trim().parse().ok()
    };
    if let (Some(max), Some(current)) = (cgroup("memory.max"), cgroup("memory.current")) {
        best = best.min(max.saturating_sub(current));
    }
    Some(best)
}

/// Peak resident memory of this process (bytes), since start or the last reset.
pub fn peak_rss() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmHWM:")
}

/// Current resident memory of this process (bytes).
pub fn current_rss() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:")
}

/// Resets the kernel's peak-RSS counter, so that each measurement stands alone.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A `Name:   1234 kB` line of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `1.2 GB`.
pub fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        assert_eq!(kib_field("VmHWM:\t  2048 kB\nVmRSS:  1 kB\n", "VmRSS:"), Some(1024));
        assert_eq!(kib_field("VmHWM: x kB", "VmHWM:"), None);
        // On Linux the process itself is resident and the machine has some memory free.
        if cfg!(target_os = "linux") {
            let rss = current_rss().expect("VmRSS");
            assert!(rss > 1 << 20 && peak_rss().expect("VmHWM") >= rss);
            assert!(available().expect("MemAvailable") > 0);
        }
    }
}

//! Shared by the benchmarks: measurements every report needs.
#![allow(dead_code)] // not every benchmark uses every helper

/// The process's peak resident memory in bytes (VmHWM), 0 where /proc is not there.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

//! Tessera's benchmark harness: block workloads run through the driver
//! against a cluster, reporting IOPS, MB/s, latency percentiles and CPU
//! seconds per GiB moved (client and servers together).
//!
//! The `tessera bench` command drives it (see the README); `bench/compare.sh`
//! runs the same workloads side by side with fio on the raw disk and with
//! peer NBD servers. Numbers come from runs, never from tests.

pub mod cpu;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tessera_driver::{DriverError, Volume};

/// One workload: block size, queue depth, read share, access pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub block_size: u32,
    pub queue_depth: u32,
    /// Percent of operations that are reads (the rest are writes).
    pub read_percent: u8,
    pub sequential: bool,
}

/// The standard set: 4 KiB random read and write at QD 1 and 32, 1 MiB
/// sequential read and write, and a 70/30 random read/write mix.
pub const STANDARD: [Workload; 7] = [
    Workload {
        name: "randread-4k-qd1",
        block_size: 4096,
        queue_depth: 1,
        read_percent: 100,
        sequential: false,
    },
    Workload {
        name: "randread-4k-qd32",
        block_size: 4096,
        queue_depth: 32,
        read_percent: 100,
        sequential: false,
    },
    Workload {
        name: "randwrite-4k-qd1",
        block_size: 4096,
        queue_depth: 1,
        read_percent: 0,
        sequential: false,
    },
    Workload {
        name: "randwrite-4k-qd32",
        block_size: 4096,
        queue_depth: 32,
        read_percent: 0,
        sequential: false,
    },
    Workload {
        name: "seqread-1m-qd4",
        block_size: 1 << 20,
        queue_depth: 4,
        read_percent: 100,
        sequential: true,
    },
    Workload {
        name: "seqwrite-1m-qd4",
        block_size: 1 << 20,
        queue_depth: 4,
        read_percent: 0,
        sequential: true,
    },
    Workload {
        name: "randrw70-4k-qd32",
        block_size: 4096,
        queue_depth: 32,
        read_percent: 70,
        sequential: false,
    },
];

/// Look workloads up by name.
pub fn select(names: &[String]) -> Result<Vec<Workload>, String> {
    names
        .iter()
        .map(|n| {
            STANDARD
                .iter()
                .find(|w| w.name == n)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = STANDARD.iter().map(|w| w.name).collect();
                    format!("unknown workload {n:?}; known: {}", known.join(", "))
                })
        })
        .collect()
}

/// What one workload measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: Workload,
    pub seconds: f64,
    pub ops: u64,
    pub iops: f64,
    pub mb_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// CPU seconds (client and the given server processes) per GiB moved.
    pub cpu_sec_per_gib: f64,
}

/// Live counters a progress display can read while a workload runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
}

/// Fill `[0, span)` with data so that reads read from the disk.
pub async fn prefill(volume: &Volume, span: u64, progress: &Progress) -> Result<(), DriverError> {
    const CHUNK: u64 = 4 << 20;
    let data = Arc::new(noise(CHUNK as usize, 7));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (volume, data, next) = (volume.clone(), data.clone(), next.clone());
        tasks.push(async move {
            loop {
                let at = next.fetch_add(CHUNK, Ordering::Relaxed);
                if at >= span {
                    return Ok::<(), DriverError>(());
                }
                let len = (span - at).min(CHUNK) as usize;
                volume.write_at(at, &data[..len]).await?;
            }
        });
    }
    for result in futures_util::future::join_all(tasks).await {
        result?;
    }
    progress.bytes.store(span, Ordering::Relaxed);
    volume.flush().await
}

/// Run `workload` over `[0, span)` of `volume` for `duration`. `servers`
/// are the pids of server processes on this machine whose CPU time counts.
pub async fn run(
    volume: &Volume,
    workload: &Workload,
    span: u64,
    duration: Duration,
    seed: u64,
    servers: &[u32],
    progress: Arc<Progress>,
) -> Result<Report, DriverError> {
    let block = u64::from(workload.block_size);
    let blocks = (span / block).max(1);
    let data = Arc::new(noise(workload.block_size as usize, seed));
    let cursor = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu::seconds(servers);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..workload.queue_depth {
        let (volume, data, cursor, stop, progress, workload) = (
            volume.clone(),
            data.clone(),
            cursor.clone(),
            stop.clone(),
            progress.clone(),
            workload.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(lane) << 32));
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut buf = vec![0u8; workload.block_size as usize];
            while !stop.load(Ordering::Relaxed) {
                let index = if workload.sequential {
                    cursor.fetch_add(1, Ordering::Relaxed) % blocks
                } else {
                    rng.random_range(0..blocks)
                };
                let read = rng.random_range(0..100u8) < workload.read_percent;
                let t = Instant::now();
                if read {
                    volume.read_at(index * block, &mut buf).await?;
                } else {
                    volume.write_at(index * block, &data).await?;
                }
                latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                progress.ops.fetch_add(1, Ordering::Relaxed);
                progress.bytes.fetch_add(block, Ordering::Relaxed);
            }
            Ok::<Vec<u32>, DriverError>(latencies)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        match task.await {
            Ok(lane) => latencies.extend(lane?),
            Err(e) => {
                return Err(DriverError::Unavailable {
                    volume: volume.name().to_string(),
                    reason: format!("a benchmark task failed: {e}"),
                });
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu::seconds(servers) - cpu_before;
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    let bytes = ops * block;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    Ok(Report {
        workload: workload.clone(),
        seconds,
        ops,
        iops: ops as f64 / seconds,
        mb_per_sec: bytes as f64 / seconds / 1e6,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        p999_us: percentile(&latencies, 99.9),
        cpu_sec_per_gib: if gib > 0.0 { cpu / gib } else { 0.0 },
    })
}

/// The `p`th percentile of sorted latencies (0 for none).
pub fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // In tenths of a percent, in integers: 99.9% of 1000 is exactly 999.
    let tenths = (p * 10.0).round() as u64;
    let rank = (tenths * sorted.len() as u64).div_ceil(1000) as usize;
    u64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Incompressible bytes, the same for a seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

/// A table for people.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<20} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
        "WORKLOAD", "IOPS", "MB/s", "p50 µs", "p99 µs", "p99.9 µs", "CPU s/GiB"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<20} {:>10.0} {:>9.1} {:>9} {:>9} {:>9} {:>10.2}\n",
            r.workload.name, r.iops, r.mb_per_sec, r.p50_us, r.p99_us, r.p999_us, r.cpu_sec_per_gib
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_data() {
        let data: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&data, 50.0), 500);
        assert_eq!(percentile(&data, 99.0), 990);
        assert_eq!(percentile(&data, 99.9), 999);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.9), 7);
    }

    #[test]
    fn workloads_are_found_by_name() {
        let found = select(&["randread-4k-qd32".into()]);
        assert_eq!(found.map(|w| w[0].queue_depth), Ok(32));
        assert!(select(&["nope".into()]).is_err_and(|e| e.contains("randread-4k-qd1")));
    }
}

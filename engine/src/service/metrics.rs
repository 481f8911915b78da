//! A storage server's counters, served over HTTP in the Prometheus text
//! format (`GET /metrics`). Counters are plain cells: the server is one
//! thread, and a scrape reads them between requests.

use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use tessera_net::proto::{Opcode, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use crate::service::Service;

/// Upper bounds (µs) of the latency histogram buckets; +Inf follows.
const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];
/// The longest request a scraper may send (headers included).
const MAX_HTTP_REQUEST: usize = 8 << 10;
/// How long a scraper may take to send its request, and to take the answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Metrics connections served at once.
const MAX_HTTP_CONNECTIONS: usize = 16;
/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A Prometheus histogram of request latencies.
#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative), the last one being +Inf.
    counts: [Cell<u64>; BUCKETS_US.len() + 1],
    sum_us: Cell<u64>,
}

impl Histogram {
    fn observe(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US.partition_point(|bound| *bound < us);
        bump(&self.counts[bucket], 1);
        bump(&self.sum_us, us);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.get();
            let le = BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.get() as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get().saturating_add(by));
}

/// What the data service has done since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered OK, by opcode (index `Opcode::ALL`).
    served: [Cell<u64>; Opcode::ALL.len()],
    /// Latency of requests answered OK, header read to reply sent, by opcode.
    latency: [Histogram; Opcode::ALL.len()],
    /// Requests refused, by status (index `Status::ALL`).
    refused: [Cell<u64>; Status::ALL.len()],
    bytes_read: Cell<u64>,
    bytes_written: Cell<u64>,
}

fn opcode_name(op: Opcode) -> &'static str {
    match op {
        Opcode::Read => "read",
        Opcode::Write => "write",
        Opcode::Flush => "flush",
        Opcode::Trim => "trim",
        Opcode::WriteZeroes => "write_zeroes",
        Opcode::Ping => "ping",
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Ok => "ok",
        Status::StaleEpoch => "stale_epoch",
        Status::Fenced => "fenced",
        Status::NotOwner => "not_owner",
        Status::OutOfRange => "out_of_range",
        Status::BadRequest => "bad_request",
        Status::ChecksumMismatch => "checksum_mismatch",
        Status::IoError => "io_error",
        Status::Unavailable => "unavailable",
        Status::Forbidden => "forbidden",
    }
}

impl Metrics {
    /// A request answered OK after `latency`; a read's or write's `bytes`
    /// count as payload moved.
    pub fn served(&self, op: Opcode, bytes: u64, latency: Duration) {
        let i = Opcode::ALL.iter().position(|o| *o == op).unwrap_or(0);
        bump(&self.served[i], 1);
        self.latency[i].observe(latency);
        match op {
            Opcode::Read => bump(&self.bytes_read, bytes),
            Opcode::Write => bump(&self.bytes_written, bytes),
            _ => {}
        }
    }

    /// A request refused with `status`.
    pub fn refused(&self, status: Status) {
        let i = Status::ALL.iter().position(|s| *s == status).unwrap_or(0);
        bump(&self.refused[i], 1);
    }

    /// The text exposition of these counters and of `service`'s state now.
    pub fn render(&self, service: &Service) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "tessera_requests_total",
            "counter",
            "Data requests answered OK, by opcode.",
        );
        for (op, count) in Opcode::ALL.iter().zip(&self.served) {
            let _ = writeln!(
                out,
                "tessera_requests_total{{op=\"{}\"}} {}",
                opcode_name(*op),
                count.get()
            );
        }
        header(
            &mut out,
            "tessera_request_seconds",
            "histogram",
            "Latency of data requests answered OK, from header to reply.",
        );
        for (op, histogram) in Opcode::ALL.iter().zip(&self.latency) {
            histogram.render(
                &mut out,
                "tessera_request_seconds",
                &format!("op=\"{}\"", opcode_name(*op)),
            );
        }
        header(
            &mut out,
            "tessera_refusals_total",
            "counter",
            "Data requests refused, by status.",
        );
        for (status, count) in Status::ALL.iter().zip(&self.refused).skip(1) {
            let _ = writeln!(
                out,
                "tessera_refusals_total{{status=\"{}\"}} {}",
                status_name(*status),
                count.get()
            );
        }
        header(
            &mut out,
            "tessera_read_bytes_total",
            "counter",
            "Payload bytes read by clients.",
        );
        let _ = writeln!(out, "tessera_read_bytes_total {}", self.bytes_read.get());
        header(
            &mut out,
            "tessera_written_bytes_total",
            "counter",
            "Payload bytes written by clients and primaries.",
        );
        let _ = writeln!(
            out,
            "tessera_written_bytes_total {}",
            self.bytes_written.get()
        );
        header(
            &mut out,
            "tessera_resynced_bytes_total",
            "counter",
            "Bytes this server copied to mirrors in resyncs.",
        );
        let _ = writeln!(
            out,
            "tessera_resynced_bytes_total {}",
            service.replication.resynced_bytes()
        );
        let store = &service.store;
        let volumes = store.volumes();
        header(
            &mut out,
            "tessera_volumes",
            "gauge",
            "Volumes this server holds pages of.",
        );
        let _ = writeln!(out, "tessera_volumes {}", volumes.len());
        let (used, total) = store.bitmask_usage();
        header(
            &mut out,
            "tessera_bitmask_blocks",
            "gauge",
            "Bitmask pool blocks in use, and in all.",
        );
        let _ = writeln!(out, "tessera_bitmask_blocks{{state=\"used\"}} {used}");
        let _ = writeln!(out, "tessera_bitmask_blocks{{state=\"total\"}} {total}");
        header(
            &mut out,
            "tessera_dirty_regions",
            "gauge",
            "Regions a peer may lack, by volume and peer.",
        );
        // Peer names need no escaping in labels: certificates allow only [A-Za-z0-9._-].
        for volume in &volumes {
            for peer in store.dirty_peers(volume.id) {
                let count = store.dirty_count(volume.id, &peer, 0..u64::MAX);
                let _ = writeln!(
                    out,
                    "tessera_dirty_regions{{volume=\"{}\",peer=\"{peer}\"}} {count}",
                    volume.id.0
                );
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Serve `GET /metrics` on `listener` until the process ends.
pub async fn serve_metrics(service: Rc<Service>, listener: TcpListener) {
    // Scrapers are few: more connections at once than this are closed at
    // once, so idle ones cannot take the process's file descriptors.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: the connection stays queued, so
                // trying again at once would spin.
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing this one");
            continue;
        };
        let service = service.clone();
        tokio_uring::spawn(async move {
            if let Err(e) = answer(&service, stream).await {
                debug!(%peer, error = %e, "metrics request failed");
            }
            drop(slot);
        });
    }
}

/// Read one HTTP request and answer it; the connection then closes.
async fn answer(service: &Service, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let head_read = tokio::time::timeout(HTTP_TIMEOUT, async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || request.len() + n > MAX_HTTP_REQUEST {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    if let Ok(Err(e)) = head_read {
        return Err(e);
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut words = std::str::from_utf8(line).unwrap_or("").split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", service.metrics.render(service)),
        (Some("GET"), Some(_)) => (
            "404 Not Found",
            "only /metrics is served here\n".to_string(),
        ),
        _ => ("400 Bad Request", "expected GET /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = tokio::time::timeout(HTTP_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    sent.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the scraper did not take the answer",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded_above() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(30));
        let mut out = String::new();
        h.render(&mut out, "t", "op=\"read\"");
        assert!(
            out.contains("t_bucket{op=\"read\",le=\"0.00005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("t_bucket{op=\"read\",le=\"0.0001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("t_bucket{op=\"read\",le=\"0.00025\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("t_bucket{op=\"read\",le=\"1\"} 3\n"), "{out}");
        assert!(
            out.contains("t_bucket{op=\"read\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("t_count{op=\"read\"} 4\n"), "{out}");
        assert!(out.contains("t_sum{op=\"read\"} 30.000241\n"), "{out}");
    }
}

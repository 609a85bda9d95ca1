//! Counters and latency histograms of the SDC, and their Prometheus text.
//!
//! Everything here is a relaxed atomic, updated on the IO path without
//! locks; readers (the mgmt port, the periodic SQLite writer, heartbeats)
//! take snapshots.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::nbd::proto::Command;

/// Upper bounds of the latency buckets, in microseconds.
const LATENCY_BOUNDS_US: [u64; 14] =
    [25, 50, 100, 200, 300, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000];

/// A cumulative latency histogram.
#[derive(Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        if let Some(i) = LATENCY_BOUNDS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Approximate quantile (bucket upper bound), in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= target {
                return LATENCY_BOUNDS_US[i];
            }
        }
        LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1]
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = LATENCY_BOUNDS_US[i] as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us() as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counters of one kind of operation.
#[derive(Default)]
pub struct OpCounters {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latency: LatencyHistogram,
}

impl OpCounters {
    pub fn record(&self, bytes: u64, ok: bool, elapsed: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(elapsed);
    }
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// The NBD commands that are counted, in metrics order.
pub const COUNTED_COMMANDS: [Command; 7] = [
    Command::Read,
    Command::Write,
    Command::Flush,
    Command::Trim,
    Command::WriteZeroes,
    Command::Cache,
    Command::BlockStatus,
];

/// Statistics of the NBD front end.
#[derive(Default)]
pub struct NbdStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicI64,
    /// Connections closed because their byte stream made no sense.
    pub protocol_errors: AtomicU64,
    pub handshakes_failed: AtomicU64,
    /// Connections closed in the handshake to make room (`--max-handshakes`).
    pub handshakes_evicted: AtomicU64,
    /// Sessions closed because `--max-connections` were served already.
    pub sessions_refused: AtomicU64,
    /// Connections closed because a WRITE payload did not arrive in time.
    pub payload_timeouts: AtomicU64,
    /// Sessions that switched to TLS (NBD_OPT_STARTTLS).
    pub tls_sessions: AtomicU64,
    /// Options refused with NBD_REP_ERR_TLS_REQD (or an EXPORT_NAME closed)
    /// because this server requires TLS and the client had not started it.
    pub tls_required_refusals: AtomicU64,
    pub requests_in_flight: AtomicI64,
    commands: [OpCounters; COUNTED_COMMANDS.len()],
}

impl NbdStats {
    pub fn command(&self, c: Command) -> Option<&OpCounters> {
        COUNTED_COMMANDS.iter().position(|&k| k == c).map(|i| &self.commands[i])
    }

    /// Appends the Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(out, "# TYPE pflex_sdc_nbd_connections_total counter");
        let _ = writeln!(out, "pflex_sdc_nbd_connections_total {}", g(&self.connections_total));
        let _ = writeln!(out, "# TYPE pflex_sdc_nbd_connections_active gauge");
        let _ = writeln!(
            out,
            "pflex_sdc_nbd_connections_active {}",
            self.connections_active.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE pflex_sdc_nbd_protocol_errors_total counter");
        let _ = writeln!(out, "pflex_sdc_nbd_protocol_errors_total {}", g(&self.protocol_errors));
        for (name, value) in [
            ("pflex_sdc_nbd_handshakes_evicted_total", &self.handshakes_evicted),
            ("pflex_sdc_nbd_sessions_refused_total", &self.sessions_refused),
            ("pflex_sdc_nbd_payload_timeouts_total", &self.payload_timeouts),
            ("pflex_sdc_nbd_tls_sessions_total", &self.tls_sessions),
            ("pflex_sdc_nbd_tls_required_refusals_total", &self.tls_required_refusals),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", g(value));
        }
        let _ = writeln!(out, "# TYPE pflex_sdc_nbd_handshakes_failed_total counter");
        let _ =
            writeln!(out, "pflex_sdc_nbd_handshakes_failed_total {}", g(&self.handshakes_failed));
        let _ = writeln!(out, "# TYPE pflex_sdc_nbd_requests_in_flight gauge");
        let _ = writeln!(
            out,
            "pflex_sdc_nbd_requests_in_flight {}",
            self.requests_in_flight.load(Ordering::Relaxed)
        );
        for (name, kind, pick) in [
            ("pflex_sdc_nbd_requests_total", "counter", 0),
            ("pflex_sdc_nbd_bytes_total", "counter", 1),
            ("pflex_sdc_nbd_errors_total", "counter", 2),
        ] {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (c, counters) in COUNTED_COMMANDS.iter().zip(&self.commands) {
                let v = match pick {
                    0 => counters.ops(),
                    1 => counters.bytes(),
                    _ => counters.errors(),
                };
                let _ = writeln!(out, "{name}{{op=\"{}\"}} {v}", c.name());
            }
        }
        let _ = writeln!(out, "# TYPE pflex_sdc_nbd_request_seconds histogram");
        for (c, counters) in COUNTED_COMMANDS.iter().zip(&self.commands) {
            counters.latency.render(
                out,
                "pflex_sdc_nbd_request_seconds",
                &format!("op=\"{}\"", c.name()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_and_text() {
        let h = LatencyHistogram::default();
        for us in [10, 40, 90, 90, 90, 2_000_000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 6);
        assert_eq!(h.quantile_us(0.5), 100);
        assert_eq!(h.quantile_us(0.1), 25);
        let s = NbdStats::default();
        s.command(Command::Read).unwrap().record(4096, true, Duration::from_micros(80));
        s.command(Command::Write).unwrap().record(10, false, Duration::from_micros(80));
        let mut out = String::new();
        s.render(&mut out);
        assert!(out.contains("pflex_sdc_nbd_requests_total{op=\"read\"} 1"));
        assert!(out.contains("pflex_sdc_nbd_bytes_total{op=\"read\"} 4096"));
        assert!(out.contains("pflex_sdc_nbd_errors_total{op=\"write\"} 1"));
        assert!(out.contains("pflex_sdc_nbd_request_seconds_bucket{op=\"read\",le=\"0.0001\"} 1"));
        assert!(s.command(Command::Disc).is_none());
    }
}

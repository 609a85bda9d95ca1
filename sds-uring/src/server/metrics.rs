//! Counters of the SDS, rendered as Prometheus text on `/metrics` and
//! summarized into heartbeat [`NodeMetrics`].
//!
//! Every data-plane reply is counted by status (each rejection has its own
//! code), and served ops by kind with their bytes. Plain relaxed atomics:
//! the counters are independent and only ever read for reporting.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use pflex_proto::api::NodeMetrics;
use pflex_proto::frame::{Op, Status};

/// Highest status code + 1 (see [`Status`]).
const STATUS_SLOTS: usize = 32;
/// Highest op code + 1 (see [`Op`]).
const OP_SLOTS: usize = 16;

const ALL_STATUSES: [Status; 21] = [
    Status::Ok,
    Status::IoError,
    Status::Invalid,
    Status::BadCrc,
    Status::NoSpace,
    Status::UnknownVolume,
    Status::NoToken,
    Status::BadSignature,
    Status::Expired,
    Status::WrongVolume,
    Status::ReadOnly,
    Status::Revoked,
    Status::StaleEpoch,
    Status::BadMac,
    Status::Replay,
    Status::NotPrimary,
    Status::ReplicaFailed,
    Status::MalformedToken,
    Status::NotAvailable,
    Status::Superseded,
    Status::DataCorrupt,
];

const ALL_OPS: [Op; 11] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::Auth,
    Op::Ping,
    Op::Allocation,
    Op::Lease,
    Op::DirtyList,
    Op::LeaseRelease,
];

/// Short stable op name, used in labels and IO acknowledgements.
pub fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Trim => "trim",
        Op::WriteZeroes => "write_zeroes",
        Op::Auth => "auth",
        Op::Ping => "ping",
        Op::Allocation => "allocation",
        Op::Lease => "lease",
        Op::DirtyList => "dirty_list",
        Op::LeaseRelease => "lease_release",
    }
}

/// Upper bounds (microseconds) of the request latency histogram buckets.
/// Fine below 250 µs, where a 4 KiB request on a fast device lands.
const LATENCY_BOUNDS_US: [u64; 23] = [
    10, 20, 30, 40, 50, 60, 70, 80, 100, 125, 150, 200, 250, 500, 1_000, 2_500, 5_000, 10_000,
    25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Latency histogram of one (role, op): cumulative counts are made when rendering.
#[derive(Default)]
struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    fn observe(&self, elapsed: std::time::Duration) {
        let us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket =
            LATENCY_BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// All counters of one SDS process.
#[derive(Default)]
pub struct SdsMetrics {
    /// Request latency (receipt to reply queued) by role (client, replica) and op.
    latency: [[LatencyHistogram; OP_SLOTS]; 2],
    replies: [AtomicU64; STATUS_SLOTS],
    /// Replies to replication frames, by status (also counted in `replies`).
    replica_replies: [AtomicU64; STATUS_SLOTS],
    ops: [AtomicU64; OP_SLOTS],
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub forwards: AtomicU64,
    pub forward_failures: AtomicU64,
    pub leases_renewed: AtomicU64,
    pub lease_failures: AtomicU64,
    pub lease_waits: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Idle connections closed to make room (see `--max-connections`).
    pub connections_evicted: AtomicU64,
    pub framing_errors: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub registrations: AtomicU64,
    pub acks_sent: AtomicU64,
    pub ack_failures: AtomicU64,
    pub placement_fetches: AtomicU64,
    pub rebuild_chunks_copied: AtomicU64,
    pub rebuilds_completed: AtomicU64,
    pub rebuild_failures: AtomicU64,
    pub chunks_reclaimed: AtomicU64,
    pub degraded_writes: AtomicU64,
    pub chunks_reconciled: AtomicU64,
    pub checksum_repairs: AtomicU64,
    pub scrub_chunks: AtomicU64,
    pub scrub_repairs: AtomicU64,
}

/// Point-in-time values that are not counters (passed in when rendering).
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub cached_tokens: u64,
    pub cached_placements: u64,
    /// Chunks in the dirty log (their other copy may lack them).
    pub dirty_chunks: u64,
    pub registered: bool,
    pub uptime_secs: u64,
}

impl SdsMetrics {
    /// Counts one reply with `status` to a request of `op`.
    pub fn count_reply(&self, op: Option<Op>, status: Status, replica: bool) {
        self.replies[status as usize % STATUS_SLOTS].fetch_add(1, Ordering::Relaxed);
        if replica {
            self.replica_replies[status as usize % STATUS_SLOTS].fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(op), Status::Ok) = (op, status) {
            self.ops[op as usize % OP_SLOTS].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records how long a request took, from receipt to its reply being queued.
    pub fn observe_latency(&self, op: Op, replica: bool, elapsed: std::time::Duration) {
        self.latency[usize::from(replica)][op as usize % OP_SLOTS].observe(elapsed);
    }

    /// Replies sent with `status` so far.
    pub fn replies(&self, status: Status) -> u64 {
        self.replies[status as usize % STATUS_SLOTS].load(Ordering::Relaxed)
    }

    fn ops(&self, op: Op) -> u64 {
        self.ops[op as usize % OP_SLOTS].load(Ordering::Relaxed)
    }

    /// The heartbeat's view of this node.
    pub fn node_metrics(&self, capacity_bytes: u64, used_bytes: u64) -> NodeMetrics {
        let errors =
            ALL_STATUSES.iter().filter(|s| **s != Status::Ok).map(|s| self.replies(*s)).sum();
        NodeMetrics {
            capacity_bytes,
            used_bytes,
            read_ops: self.ops(Op::Read),
            write_ops: self.ops(Op::Write) + self.ops(Op::Trim) + self.ops(Op::WriteZeroes),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            errors,
        }
    }

    /// Prometheus text exposition of every counter and `gauges`.
    pub fn render(&self, node: &str, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let label = format!("node=\"{}\"", node.replace(['"', '\\', '\n'], "_"));
        pflex_httpd::render_metrics("pflex_sds", &mut out);
        out.push_str("# HELP pflex_sds_replies_total Data-plane replies by status.\n");
        out.push_str("# TYPE pflex_sds_replies_total counter\n");
        for status in ALL_STATUSES {
            let _ = writeln!(
                out,
                "pflex_sds_replies_total{{{label},status=\"{}\"}} {}",
                status.name(),
                self.replies(status)
            );
        }
        out.push_str(
            "# HELP pflex_sds_replica_replies_total Replies to replication frames by status.\n",
        );
        out.push_str("# TYPE pflex_sds_replica_replies_total counter\n");
        for status in ALL_STATUSES {
            let n = self.replica_replies[status as usize % STATUS_SLOTS].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pflex_sds_replica_replies_total{{{label},status=\"{}\"}} {n}",
                status.name()
            );
        }
        out.push_str(
            "# HELP pflex_sds_ops_total Data-plane requests served successfully, by op.\n",
        );
        out.push_str("# TYPE pflex_sds_ops_total counter\n");
        for op in ALL_OPS {
            let _ = writeln!(
                out,
                "pflex_sds_ops_total{{{label},op=\"{}\"}} {}",
                op_name(op),
                self.ops(op)
            );
        }
        out.push_str(
            "# HELP pflex_sds_request_duration_seconds Data-plane request latency, receipt to reply.\n",
        );
        out.push_str("# TYPE pflex_sds_request_duration_seconds histogram\n");
        for (role_index, role) in ["client", "replica"].into_iter().enumerate() {
            for op in ALL_OPS {
                let histogram = &self.latency[role_index][op as usize % OP_SLOTS];
                let mut cumulative = 0;
                for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
                    cumulative += histogram.buckets[i].load(Ordering::Relaxed);
                    let _ = writeln!(
                        out,
                        "pflex_sds_request_duration_seconds_bucket{{{label},role=\"{role}\",op=\"{}\",le=\"{}\"}} {cumulative}",
                        op_name(op),
                        *bound as f64 / 1e6
                    );
                }
                cumulative += histogram.buckets[LATENCY_BOUNDS_US.len()].load(Ordering::Relaxed);
                let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
                let op = op_name(op);
                let _ = writeln!(
                    out,
                    "pflex_sds_request_duration_seconds_bucket{{{label},role=\"{role}\",op=\"{op}\",le=\"+Inf\"}} {cumulative}\n\
                     pflex_sds_request_duration_seconds_sum{{{label},role=\"{role}\",op=\"{op}\"}} {sum}\n\
                     pflex_sds_request_duration_seconds_count{{{label},role=\"{role}\",op=\"{op}\"}} {cumulative}"
                );
            }
        }
        let counters: [(&str, &str, &AtomicU64); 25] = [
            (
                "pflex_sds_checksum_repairs_total",
                "Chunks of this copy found corrupt on a read and rewritten from the other copy.",
                &self.checksum_repairs,
            ),
            (
                "pflex_sds_scrub_chunks_total",
                "Chunks checked by scrub passes (both copies read and compared).",
                &self.scrub_chunks,
            ),
            (
                "pflex_sds_scrub_repairs_total",
                "Chunk copies rewritten by scrub (corrupt or different from the primary's).",
                &self.scrub_repairs,
            ),
            (
                "pflex_sds_degraded_writes_total",
                "Writes to a PG running on this copy alone (logged for resync).",
                &self.degraded_writes,
            ),
            (
                "pflex_sds_chunks_reconciled_total",
                "Dirty chunks copied to the secondary before they were served.",
                &self.chunks_reconciled,
            ),
            (
                "pflex_sds_chunks_reclaimed_total",
                "Chunks released because their PG no longer has a copy on this node.",
                &self.chunks_reclaimed,
            ),
            (
                "pflex_sds_rebuild_chunks_copied_total",
                "Chunks this node copied to a new secondary.",
                &self.rebuild_chunks_copied,
            ),
            (
                "pflex_sds_rebuilds_completed_total",
                "Rebuild jobs this node finished and reported.",
                &self.rebuilds_completed,
            ),
            (
                "pflex_sds_rebuild_failures_total",
                "Rebuild attempts that stopped early (retried at a later heartbeat).",
                &self.rebuild_failures,
            ),
            ("pflex_sds_read_bytes_total", "Bytes read for clients.", &self.read_bytes),
            (
                "pflex_sds_write_bytes_total",
                "Bytes written (client and replica).",
                &self.write_bytes,
            ),
            (
                "pflex_sds_replica_forwards_total",
                "Requests forwarded to a secondary.",
                &self.forwards,
            ),
            (
                "pflex_sds_replica_forward_failures_total",
                "Forwards that failed.",
                &self.forward_failures,
            ),
            (
                "pflex_sds_leases_renewed_total",
                "Leases this node's secondaries granted it.",
                &self.leases_renewed,
            ),
            (
                "pflex_sds_lease_failures_total",
                "Lease requests refused or unanswered.",
                &self.lease_failures,
            ),
            (
                "pflex_sds_lease_waits_total",
                "Requests that waited out a lease this node granted before serving as primary.",
                &self.lease_waits,
            ),
            (
                "pflex_sds_connections_total",
                "Data-plane connections accepted.",
                &self.connections_accepted,
            ),
            (
                "pflex_sds_connections_evicted_total",
                "Idle data-plane connections closed to make room for new ones (--max-connections).",
                &self.connections_evicted,
            ),
            (
                "pflex_sds_framing_errors_total",
                "Connections closed on a bad frame.",
                &self.framing_errors,
            ),
            ("pflex_sds_heartbeats_total", "Heartbeats the MDM accepted.", &self.heartbeats_sent),
            (
                "pflex_sds_heartbeat_failures_total",
                "Heartbeats that failed.",
                &self.heartbeat_failures,
            ),
            (
                "pflex_sds_registrations_total",
                "Successful registrations with the MDM.",
                &self.registrations,
            ),
            ("pflex_sds_ack_batches_total", "IO acknowledgement batches sent.", &self.acks_sent),
            (
                "pflex_sds_ack_failures_total",
                "IO acknowledgement batches that failed.",
                &self.ack_failures,
            ),
            (
                "pflex_sds_placement_fetches_total",
                "Placement maps fetched from the MDM.",
                &self.placement_fetches,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name}{{{label}}} {}", value.load(Ordering::Relaxed));
        }
        let gauges_list = [
            ("pflex_sds_capacity_bytes", "Device capacity.", gauges.capacity_bytes),
            ("pflex_sds_used_bytes", "Capacity holding chunks.", gauges.used_bytes),
            ("pflex_sds_cached_tokens", "Verified IO tokens in memory.", gauges.cached_tokens),
            ("pflex_sds_cached_placements", "Placement maps in memory.", gauges.cached_placements),
            (
                "pflex_sds_dirty_chunks",
                "Chunks whose other copy may lack them (resynced when it is back).",
                gauges.dirty_chunks,
            ),
            (
                "pflex_sds_registered",
                "1 when registered with the MDM.",
                u64::from(gauges.registered),
            ),
            ("pflex_sds_uptime_seconds", "Seconds since start.", gauges.uptime_secs),
        ];
        for (name, help, value) in gauges_list {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{label}}} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_counter() {
        let m = SdsMetrics::default();
        m.count_reply(Some(Op::Write), Status::BadMac, false);
        m.count_reply(Some(Op::Write), Status::Ok, true);
        m.read_bytes.fetch_add(4096, Ordering::Relaxed);
        let text = m.render("sds1", Gauges::default());
        assert!(text.contains("pflex_sds_replies_total{node=\"sds1\",status=\"bad_mac\"} 1"));
        assert!(text.contains("pflex_sds_replies_total{node=\"sds1\",status=\"replay\"} 0"));
        assert!(text.contains("pflex_sds_ops_total{node=\"sds1\",op=\"write\"} 1"));
        assert!(text.contains("pflex_sds_read_bytes_total{node=\"sds1\"} 4096"));
        m.observe_latency(Op::Write, false, std::time::Duration::from_micros(80));
        m.observe_latency(Op::Write, false, std::time::Duration::from_secs(5));
        let text = m.render("sds1", Gauges::default());
        let bucket = |le: &str| {
            format!("pflex_sds_request_duration_seconds_bucket{{node=\"sds1\",role=\"client\",op=\"write\",le=\"{le}\"}}")
        };
        assert!(text.contains(&format!("{} 0", bucket("0.00005"))));
        assert!(text.contains(&format!("{} 1", bucket("0.0001"))));
        assert!(text.contains(&format!("{} 1", bucket("1"))));
        assert!(text.contains(&format!("{} 2", bucket("+Inf"))));
        let nm = m.node_metrics(10, 5);
        assert_eq!((nm.write_ops, nm.errors, nm.read_bytes), (1, 1, 4096));
    }
}

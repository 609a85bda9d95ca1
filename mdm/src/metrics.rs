//! Prometheus text exposition of the MDM (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use pflex_proto::api::{ClusterSummary, HealthStatus, MovementStatus};

use crate::http::AppState;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every MDM metric.
pub fn render(
    state: &AppState,
    summary: &ClusterSummary,
    health: &HealthStatus,
    movement: &MovementStatus,
) -> String {
    let mut out = String::new();
    let c = &state.counters;
    let gauges: [(&str, &str, u64); 16] = [
        (
            "pflex_mdm_uptime_seconds",
            "Seconds since the MDM started.",
            state.started_at.elapsed().as_secs(),
        ),
        ("pflex_mdm_sds_nodes", "Registered SDS nodes.", summary.sds_count),
        ("pflex_mdm_sdc_clients", "Registered SDC clients.", summary.sdc_count),
        ("pflex_mdm_volumes", "Volumes.", summary.volume_count),
        ("pflex_mdm_capacity_bytes", "Raw capacity of all SDS devices.", summary.capacity_bytes),
        ("pflex_mdm_used_bytes", "Bytes used on all SDS devices.", summary.used_bytes),
        ("pflex_mdm_provisioned_bytes", "Sum of volume sizes.", summary.provisioned_bytes),
        (
            "pflex_mdm_reserved_bytes",
            "Capacity reserved by thick volumes (both copies).",
            summary.reserved_bytes,
        ),
        (
            "pflex_mdm_degraded_chunks",
            "Chunks with fewer than two live copies.",
            summary.degraded_chunks,
        ),
        (
            "pflex_mdm_rebuild_jobs_active",
            "Rebuild jobs pending or running.",
            summary.rebuild_jobs_active,
        ),
        (
            "pflex_mdm_move_jobs_active",
            "Rebalance and drain moves pending or running.",
            movement.move_jobs,
        ),
        (
            "pflex_mdm_movement_chunks_remaining",
            "Chunks the unfinished copy jobs still have to send.",
            movement.chunks_total.saturating_sub(movement.chunks_copied),
        ),
        (
            "pflex_mdm_movement_bytes_per_second",
            "Bytes per second sent by all copy jobs (rebuild, resync, move) over the last seconds.",
            movement.rate_bytes_per_sec,
        ),
        (
            "pflex_mdm_movement_eta_seconds",
            "Seconds until the unfinished copy jobs are done at the current rate (0 when idle).",
            movement.eta_secs.unwrap_or(0),
        ),
        (
            "pflex_mdm_movement_limit_mb_per_second",
            "Per-SDS data movement limit in MB/s (0: no limit).",
            movement.policy.mb_per_sec,
        ),
        ("pflex_mdm_sds_draining", "SDS nodes being drained.", movement.draining.len() as u64),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "pflex_mdm_cluster_state",
        "gauge",
        "1 for the current overall cluster state.",
    );
    for state_name in ["HEALTHY", "DEGRADED", "CRITICAL"] {
        let value = u8::from(health.overall == state_name);
        let _ = writeln!(out, "pflex_mdm_cluster_state{{state=\"{state_name}\"}} {value}");
    }
    family(
        &mut out,
        "pflex_mdm_components",
        "gauge",
        "Registered components by type and liveness.",
    );
    for node_type in ["SDS", "SDC", "MGMT"] {
        for status in ["ACTIVE", "STALE", "FAILED"] {
            let n = health
                .components
                .iter()
                .filter(|h| h.node_type.as_str() == node_type && h.status == status)
                .count();
            let _ = writeln!(
                out,
                "pflex_mdm_components{{type=\"{node_type}\",status=\"{status}\"}} {n}"
            );
        }
    }
    pflex_httpd::render_metrics("pflex_mdm", &mut out);
    family(
        &mut out,
        "pflex_mdm_http_responses_total",
        "counter",
        "HTTP responses by status class.",
    );
    for (class, counter) in
        [("2xx", &c.responses_2xx), ("4xx", &c.responses_4xx), ("5xx", &c.responses_5xx)]
    {
        let _ = writeln!(
            out,
            "pflex_mdm_http_responses_total{{class=\"{class}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    let counters = [
        ("pflex_mdm_registrations_total", "Accepted registrations.", &c.registrations),
        (
            "pflex_mdm_registrations_refused_total",
            "Registrations refused (no valid enrollment token, credential or join key; a name taken).",
            &c.registrations_refused,
        ),
        ("pflex_mdm_heartbeats_total", "Heartbeats received.", &c.heartbeats),
        ("pflex_mdm_tokens_issued_total", "IO tokens issued.", &c.tokens_issued),
        ("pflex_mdm_tokens_refused_total", "IO token requests refused.", &c.tokens_refused),
        ("pflex_mdm_token_acks_total", "IO completion records recorded.", &c.acks_recorded),
        (
            "pflex_mdm_copies_replaced_total",
            "Copies moved off failed SDS nodes.",
            &c.copies_replaced,
        ),
        (
            "pflex_mdm_db_batches_total",
            "Database transactions committed by the group commit (one fsync each).",
            &state.writer_stats.batches,
        ),
        (
            "pflex_mdm_db_requests_total",
            "Requests run by the group commit (requests / batches is the mean batch).",
            &state.writer_stats.requests,
        ),
        (
            "pflex_mdm_db_behind_failed_total",
            "Writes made behind their answers (token rows) that failed or were not committed.",
            &state.writer_stats.behind_failed,
        ),
    ];
    for (name, help, counter) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
    }
    if let Some(replication) = &state.replication {
        render_replication(&mut out, replication);
    }
    out
}

/// The replicated MDM as this member sees it.
fn render_replication(out: &mut String, replication: &crate::raft::Replication) {
    let status = replication.status();
    let applied = status.applied_index.unwrap_or(0);
    let last = status.last_log_index.unwrap_or(0);
    let gauges = [
        ("pflex_mdm_raft_term", "Current Raft term.", status.term),
        ("pflex_mdm_raft_leader", "1 when this member leads.", u64::from(status.role == "Leader")),
        ("pflex_mdm_raft_last_log_index", "Last entry in this member's log.", last),
        ("pflex_mdm_raft_applied_index", "Last entry applied to its database.", applied),
        (
            "pflex_mdm_raft_apply_lag",
            "Entries in the log not yet applied here.",
            last.saturating_sub(applied),
        ),
        (
            "pflex_mdm_raft_voters",
            "Voting members.",
            status.members.iter().filter(|m| m.voter).count() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        out,
        "pflex_mdm_raft_leader_changes_total",
        "counter",
        "Times this member saw the leader change.",
    );
    let _ = writeln!(
        out,
        "pflex_mdm_raft_leader_changes_total {}",
        replication.leader_changes.load(Ordering::Relaxed)
    );
    if status.role == "Leader" {
        family(
            out,
            "pflex_mdm_raft_follower_lag",
            "gauge",
            "Entries each member is behind this leader's log.",
        );
        for member in &status.members {
            let lag = last.saturating_sub(member.matched_index.unwrap_or(0));
            let _ = writeln!(out, "pflex_mdm_raft_follower_lag{{member=\"{}\"}} {lag}", member.id);
        }
    }
}

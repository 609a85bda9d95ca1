//! The MDM's own check of an SDS that a peer or client reported unreachable:
//! a data-plane `PING` that the SDS's serving loop must answer, at most once
//! a second per node, and the run of failed checks that decides when the
//! node is declared FAILED. A connect alone is not enough: the kernel of a
//! frozen (SIGSTOPped) or wedged process still completes TCP handshakes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One probe per SDS per this interval, however many clients report it
/// (a probe itself takes up to two timeouts when the node does not answer).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Each probe attempt's timeout (connect, PING, reply); the node is
/// unreachable only if both attempts fail.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// What the MDM knows of its recent probes, per SDS.
#[derive(Debug, Default)]
pub struct Probes {
    nodes: Mutex<HashMap<u64, History>>,
    /// Nodes whose failed probe is being followed up by the MDM itself.
    following: Mutex<std::collections::HashSet<u64>>,
}

#[derive(Debug, Clone, Copy)]
struct History {
    last_probe: Instant,
    /// An unbroken run of failed probes: when it began, when it last failed.
    failing: Option<(Instant, Instant)>,
}

impl Probes {
    /// Whether node `node_id` may be probed now; if so the probe counts as
    /// begun.
    pub fn begin(&self, node_id: u64) -> bool {
        self.begin_at(node_id, Instant::now())
    }

    /// Records a probe's result; true when the probes have failed without a
    /// break for `grace` (the run then starts over). A probe that works
    /// breaks the run, and so does no failed probe for `grace` (the reports
    /// stopped), so an old failure never shortens a later grace period.
    pub fn record(&self, node_id: u64, reachable: bool, grace: Duration) -> bool {
        self.record_at(node_id, reachable, grace, Instant::now())
    }

    /// Whether the caller should follow up a failed probe of `node_id` with
    /// probes of its own (false if someone does already); end with
    /// [`Self::stop_following`].
    pub fn start_following(&self, node_id: u64) -> bool {
        self.following.lock().unwrap_or_else(|p| p.into_inner()).insert(node_id)
    }

    pub fn stop_following(&self, node_id: u64) {
        self.following.lock().unwrap_or_else(|p| p.into_inner()).remove(&node_id);
    }

    fn begin_at(&self, node_id: u64, now: Instant) -> bool {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        match nodes.get_mut(&node_id) {
            Some(h) if now.duration_since(h.last_probe) < PROBE_INTERVAL => false,
            Some(h) => {
                h.last_probe = now;
                true
            }
            None => {
                nodes.insert(node_id, History { last_probe: now, failing: None });
                true
            }
        }
    }

    fn record_at(&self, node_id: u64, reachable: bool, grace: Duration, now: Instant) -> bool {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = nodes.get_mut(&node_id) else { return false };
        if reachable {
            h.failing = None;
            return false;
        }
        // Reports (and so probes) come as often as the reporters notice:
        // once a second for refused connections, once per request timeout
        // (2 s) for a node that accepts but does not answer. A gap up to the
        // grace plus two probe intervals continues the run.
        let began = match h.failing {
            Some((began, last)) if now.duration_since(last) <= grace + 2 * PROBE_INTERVAL => began,
            _ => h.last_probe,
        };
        if now.duration_since(began) >= grace {
            h.failing = None;
            true
        } else {
            h.failing = Some((began, now));
            false
        }
    }
}

/// Whether the SDS at `host:port` answers a data-plane `PING` (two attempts).
pub async fn probe(host: &str, port: u16) -> bool {
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if matches!(tokio::time::timeout(PROBE_TIMEOUT, ping(host, port)).await, Ok(Ok(true))) {
            return true;
        }
    }
    false
}

/// One `PING` on a fresh connection: true if the reply echoes it with `Ok`.
async fn ping(host: &str, port: u16) -> std::io::Result<bool> {
    use pflex_proto::frame::{FrameHeader, Op, Status, HEADER_LEN};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PROBE_ID: u64 = 0x7072_6f62_6521; // "probe!"
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    let ping = FrameHeader { op: Op::Ping as u8, request_id: PROBE_ID, ..Default::default() };
    stream.write_all(&ping.encode()).await?;
    let mut raw = [0u8; HEADER_LEN];
    stream.read_exact(&mut raw).await?;
    Ok(FrameHeader::decode(&raw)
        .is_ok_and(|r| r.request_id == PROBE_ID && r.status == Status::Ok as u16))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(5);

    /// Probes once a second from `start`, `results` in order; returns the
    /// verdict of each.
    fn run(probes: &Probes, start: Instant, results: &[bool]) -> Vec<bool> {
        results
            .iter()
            .enumerate()
            .map(|(i, ok)| {
                let at = start + Duration::from_secs(i as u64);
                assert!(probes.begin_at(1, at));
                probes.record_at(1, *ok, GRACE, at)
            })
            .collect()
    }

    #[test]
    fn a_node_is_declared_after_failing_for_the_grace_period_only() {
        let probes = Probes::default();
        let t0 = Instant::now();
        let verdicts = run(&probes, t0, &[false; 7]);
        assert_eq!(verdicts, [false, false, false, false, false, true, false]);
        // One probe that works starts the run over.
        let probes = Probes::default();
        let verdicts = run(&probes, t0, &[false, false, false, true, false, false, false, false]);
        assert!(verdicts.iter().all(|v| !v), "{verdicts:?}");
    }

    #[test]
    fn reports_a_request_timeout_apart_still_make_one_run() {
        // A frozen node: the SDC notices once per 2 s request timeout.
        let probes = Probes::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(2);
        let at = |s: u64| t0 + Duration::from_millis(s);
        let verdicts: Vec<bool> = [0, 2050, 4100]
            .into_iter()
            .map(|ms| {
                assert!(probes.begin_at(1, at(ms)));
                probes.record_at(1, false, grace, at(ms))
            })
            .collect();
        assert_eq!(verdicts, [false, true, false]);
    }

    #[test]
    fn probes_are_rate_limited_and_an_old_failure_does_not_count() {
        let probes = Probes::default();
        let t0 = Instant::now();
        assert!(probes.begin_at(1, t0));
        assert!(!probes.begin_at(1, t0 + Duration::from_millis(400)));
        assert!(probes.begin_at(2, t0), "limits are per node");
        assert!(!probes.record_at(1, false, GRACE, t0));
        // Reports stop for a minute, then the node fails again: a new grace.
        let later = t0 + Duration::from_secs(60);
        assert!(probes.begin_at(1, later));
        assert!(!probes.record_at(1, false, GRACE, later));
    }
}

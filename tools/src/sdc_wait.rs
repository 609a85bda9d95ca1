//! Waiting until a mapping change is in effect on the SDCs it concerns.
//!
//! The MDM commits a map, unmap, resize or rename at once, but an SDC learns
//! of it from its own mapping fetch (every heartbeat). So that
//! `pflex volume map db1 --sdc sdc1 && nbdinfo nbd://…/db1` works, the CLI
//! asks each SDC concerned to fetch its mappings now (`POST /volumes/refresh`
//! on its control port) and returns once the SDC's own view shows the change,
//! or fails saying which SDC does not show it. [`in_effect`] is the decision,
//! a pure function of what the SDC reports.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pflex_proto::api::SdcInfo;
use serde::Deserialize;

/// The part of an SDC's `GET /volumes` entry the decision needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SdcVolume {
    pub volume_id: u64,
    pub name: String,
    pub size_bytes: u64,
    /// The SDC has the placement map and a token: NBD requests are served.
    pub routed: bool,
    pub nbd_uri: String,
}

/// What an SDC must show once a change is in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Exported under `name` with `size_bytes`, ready to serve.
    Served { volume_id: u64, name: String, size_bytes: u64 },
    /// Not exported any more.
    Gone { volume_id: u64 },
}

/// Whether `volumes` (an SDC's own list) shows `expected`.
pub fn in_effect(expected: &Expected, volumes: &[SdcVolume]) -> bool {
    match expected {
        Expected::Served { volume_id, name, size_bytes } => volumes.iter().any(|v| {
            v.volume_id == *volume_id && v.name == *name && v.size_bytes == *size_bytes && v.routed
        }),
        Expected::Gone { volume_id } => volumes.iter().all(|v| v.volume_id != *volume_id),
    }
}

/// How long the CLI waits for an SDC by default: several heartbeats.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(15);

/// Asks `sdc` to refresh until its view shows `expected`, for at most
/// `limit`. Returns the SDC's entry for a served volume (its NBD URI).
pub async fn wait_in_effect(
    http: &reqwest::Client,
    sdc: &SdcInfo,
    expected: &Expected,
    limit: Duration,
) -> Result<Option<SdcVolume>> {
    let url = format!(
        "{}://{}:{}/volumes/refresh",
        pflex_mdm_client::trust::scheme(),
        sdc.host,
        sdc.control_port
    );
    let start = Instant::now();
    loop {
        let last_problem = match fetch(http, &url).await {
            Ok(volumes) if in_effect(expected, &volumes) => {
                let entry = match expected {
                    Expected::Served { volume_id, .. } => {
                        volumes.into_iter().find(|v| v.volume_id == *volume_id)
                    }
                    Expected::Gone { .. } => None,
                };
                return Ok(entry);
            }
            Ok(_) => "its volume list does not show the change yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= limit {
            bail!(
                "the MDM recorded the change, but SDC {} ({}:{}) does not serve it after {} s: \
                 {last_problem} (is it running? see `pflex sdc list`; --no-wait skips this check)",
                sdc.name,
                sdc.host,
                sdc.control_port,
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Vec<SdcVolume>> {
    let resp = http.post(url).timeout(Duration::from_secs(5)).send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!("{url} answered {status}: {}", resp.text().await.unwrap_or_default());
    }
    Ok(resp.json().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: u64, name: &str, size: u64, routed: bool) -> SdcVolume {
        SdcVolume {
            volume_id: id,
            name: name.into(),
            size_bytes: size,
            routed,
            nbd_uri: format!("nbd://127.0.0.1:10809/{name}"),
        }
    }

    #[test]
    fn decisions() {
        let served = Expected::Served { volume_id: 7, name: "db1".into(), size_bytes: 10 };
        let gone = Expected::Gone { volume_id: 7 };
        let table: &[(&Expected, Vec<SdcVolume>, bool)] = &[
            (&served, vec![], false),
            (&served, vec![vol(7, "db1", 10, true)], true),
            (&served, vec![vol(7, "db1", 10, false)], false), // no map or token yet
            (&served, vec![vol(7, "db1", 5, true)], false),   // old size
            (&served, vec![vol(7, "old", 10, true)], false),  // old name
            (&served, vec![vol(8, "db1", 10, true)], false),  // another volume
            (&gone, vec![], true),
            (&gone, vec![vol(8, "x", 1, true)], true),
            (&gone, vec![vol(7, "db1", 10, true)], false),
        ];
        for (i, (expected, volumes, want)) in table.iter().enumerate() {
            assert_eq!(in_effect(expected, volumes), *want, "row {i}");
        }
    }
}

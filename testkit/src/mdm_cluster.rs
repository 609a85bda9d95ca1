//! A replicated MDM of real `mdm` processes on loopback, for tests that
//! kill, freeze and replace its members while clients run; over plain HTTP,
//! or over HTTPS with a cluster CA and a member certificate for each member
//! ([`MdmCluster::start_tls`]).

use std::path::PathBuf;
use std::time::Duration;

use pflex_mdm_client::MdmClient;

use crate::cluster::JOIN_KEY;
use crate::{free_port, spawn_logged, wait_for, workspace_binary, ProcessGuard};

/// The admin token every member holds.
const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// One member: its id, port and process (None while down).
pub struct Member {
    pub id: u64,
    pub port: u16,
    scheme: &'static str,
    process: Option<ProcessGuard>,
}

impl Member {
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ProcessGuard::pid)
    }
}

/// The members and their shared files; every process is killed when dropped.
pub struct MdmCluster {
    dir: tempfile::TempDir,
    pub members: Vec<Member>,
    peers: String,
    /// The cluster CA, when the members serve HTTPS.
    ca: Option<pflex_tls::ClusterCa>,
    /// The admin token clients are given (see [`MdmCluster::use_admin_token`]).
    admin_token: String,
}

impl MdmCluster {
    /// Starts `count` members and waits until one leads.
    pub async fn start(count: u64) -> MdmCluster {
        Self::start_from(count, None).await
    }

    /// Like [`MdmCluster::start`], every member's database restored from
    /// `backup` (the bytes of `pflex mdm backup`) when given.
    pub async fn start_from(count: u64, backup: Option<&[u8]>) -> MdmCluster {
        Self::start_with(count, backup, false).await
    }

    /// Like [`MdmCluster::start`], over HTTPS: a cluster CA, which this test
    /// process trusts from now on, and for each member a certificate naming
    /// its member id.
    pub async fn start_tls(count: u64) -> MdmCluster {
        Self::start_with(count, None, true).await
    }

    async fn start_with(count: u64, backup: Option<&[u8]>, tls: bool) -> MdmCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca = tls.then(|| {
            let ca_dir = dir.path().join("ca");
            let ca = pflex_tls::ClusterCa::create(&ca_dir).expect("a cluster CA");
            pflex_mdm_client::trust::trust_cluster_ca(&ca_dir).expect("trusting the cluster CA");
            ca
        });
        let scheme = if tls { "https" } else { "http" };
        std::fs::write(dir.path().join("join_key"), format!("{JOIN_KEY}\n")).unwrap();
        let secret = pflex_proto::token::ClusterSecret::generate().to_hex();
        std::fs::write(dir.path().join("cluster_secret"), format!("{secret}\n")).unwrap();
        let members: Vec<Member> =
            (1..=count).map(|id| Member { id, port: free_port(), scheme, process: None }).collect();
        let peers =
            members.iter().map(|m| format!("{}={}", m.id, m.url())).collect::<Vec<_>>().join(",");
        let admin_token = ADMIN_TOKEN.to_string();
        let mut cluster = MdmCluster { dir, members, peers, ca, admin_token };
        if let Some(bytes) = backup {
            for member in &cluster.members {
                let member_dir = cluster.member_dir(member.id);
                std::fs::create_dir_all(&member_dir).unwrap();
                std::fs::write(member_dir.join("powerflex.db"), bytes).unwrap();
            }
        }
        for i in 0..cluster.members.len() {
            cluster.start_member(i, true);
        }
        cluster.wait_for_leader().await;
        cluster
    }

    fn member_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("mdm{id}"))
    }

    /// Issues a certificate from the cluster CA naming `name` into a new
    /// directory (the node layout: `ca-cert.pem`, `cert.pem`, `key.pem`),
    /// and returns it; None for a cluster without TLS.
    pub fn issue_certificate(&self, name: &str) -> Option<PathBuf> {
        let ca = self.ca.as_ref()?;
        let out = self.dir.path().join("certificates").join(name);
        let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
        ca.issue(name, &sans, &out, pflex_tls::Layout::Node).expect("issuing a certificate");
        Some(out)
    }

    /// The cluster secret every member holds.
    pub fn cluster_secret(&self) -> pflex_proto::token::ClusterSecret {
        let hex = std::fs::read_to_string(self.dir.path().join("cluster_secret")).unwrap();
        pflex_proto::token::ClusterSecret::from_hex(hex.trim()).expect("a cluster secret")
    }

    /// The database file of member `i`.
    pub fn db_path(&self, i: usize) -> PathBuf {
        self.member_dir(self.members[i].id).join("powerflex.db")
    }

    /// Starts (or restarts) member `i`; `initial` members get the peer list.
    fn start_member(&mut self, i: usize, initial: bool) {
        let id = self.members[i].id;
        let dir = self.member_dir(id);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, value) in [
            (
                "cluster_secret",
                std::fs::read_to_string(self.dir.path().join("cluster_secret")).unwrap(),
            ),
            ("admin_token", format!("{ADMIN_TOKEN}\n")),
        ] {
            let path = dir.join(file);
            if !path.exists() {
                std::fs::write(&path, value).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{}", self.members[i].port),
            "--data-dir".into(),
            dir.display().to_string(),
            "--join-key-file".into(),
            self.dir.path().join("join_key").display().to_string(),
            "--heartbeat-interval-secs".into(),
            "1".into(),
            "--mdm-id".into(),
            id.to_string(),
            // Snapshots and log purges happen during a test's run, and a
            // new member is brought up to date by a snapshot.
            "--mdm-snapshot-every".into(),
            "200".into(),
        ];
        if initial {
            args.extend(["--mdm-peers".to_string(), self.peers.clone()]);
        }
        if let Some(ca) = &self.ca {
            let tls = dir.join("tls");
            let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
            ca.issue(&pflex_tls::mdm_member_name(id), &sans, &tls, pflex_tls::Layout::Node)
                .expect("issuing a member certificate");
            args.extend(["--tls-dir".to_string(), tls.display().to_string()]);
        }
        let log = self.dir.path().join(format!("mdm{id}.log"));
        let process =
            spawn_logged(&format!("mdm{id}"), &workspace_binary("mdm", "mdm"), &args, &log);
        self.members[i].process = Some(process);
    }

    /// Every member's URL, comma-separated (what clients are given).
    pub fn urls(&self) -> String {
        self.members.iter().map(Member::url).collect::<Vec<_>>().join(",")
    }

    /// Gives clients made from now on `token` (after `pflex cluster
    /// rotate`); members started later still get the original one in their
    /// files, as a rotation leaves it there.
    pub fn use_admin_token(&mut self, token: &str) {
        self.admin_token = token.to_string();
    }

    /// An admin client given every member.
    pub fn admin(&self) -> MdmClient {
        MdmClient::new(&self.urls(), Some(self.admin_token.clone())).unwrap()
    }

    /// A client bound to member `i` alone.
    pub fn member_client(&self, i: usize) -> MdmClient {
        MdmClient::with_timeout(
            &self.members[i].url(),
            Some(self.admin_token.clone()),
            Duration::from_secs(2),
        )
        .unwrap()
    }

    /// The index of the member that says it leads, if one answers so.
    pub async fn leader(&self) -> Option<usize> {
        for (i, member) in self.members.iter().enumerate() {
            if member.process.is_none() {
                continue;
            }
            if let Ok(status) = self.member_client(i).mdm_status().await {
                if status.role == "Leader" {
                    return Some(i);
                }
            }
        }
        None
    }

    pub async fn wait_for_leader(&self) -> usize {
        wait_for("an MDM leader", Duration::from_secs(30), || async {
            self.leader().await.is_some()
        })
        .await;
        self.leader().await.expect("a leader")
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.members[i].process.take() {
            process.kill_hard();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.start_member(i, true);
    }

    /// SIGSTOP (`true`) or SIGCONT of member `i`: a frozen member is cut
    /// off from everyone, and comes back believing what it did before.
    pub fn freeze(&self, i: usize, frozen: bool) {
        if let Some(pid) = self.members[i].pid() {
            let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            let pid = libc::pid_t::try_from(pid).expect("a PID fits pid_t");
            // SAFETY: kill(2) on the PID of a child this cluster spawned and
            // has not reaped.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Starts a new member with a fresh id and data (not yet in the
    /// cluster: `pflex mdm add` it); returns its index.
    pub fn start_new_member(&mut self) -> usize {
        let id = self.members.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        let scheme = self.members[0].scheme;
        self.members.push(Member { id, port: free_port(), scheme, process: None });
        let i = self.members.len() - 1;
        self.start_member(i, false);
        i
    }
}

impl Drop for MdmCluster {
    fn drop(&mut self) {
        for member in &self.members {
            if let Some(pid) = member.pid() {
                // A frozen member must run again to die of SIGKILL's reaping.
                let pid = libc::pid_t::try_from(pid).expect("a PID fits pid_t");
                // SAFETY: as in `freeze`.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                }
            }
        }
        for member in &mut self.members {
            member.process.take();
        }
    }
}

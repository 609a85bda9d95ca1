//! `pflex up` as a newcomer meets it: the README's tour run verbatim against
//! the foreground cluster, and a killed storage node that must not take the
//! rest of the cluster down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pflex_testkit::{free_port, wait_for, workspace_binary};

/// The component binaries `pflex up` starts, built next to `pflex`.
fn build_components() -> PathBuf {
    for (package, bin) in
        [("mdm", "mdm"), ("sds-uring", "sds"), ("sdc-nbd", "sdc"), ("mgmt", "mgmt")]
    {
        workspace_binary(package, bin);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_pflex")).parent().unwrap().to_path_buf()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A foreground `pflex up`: stopped with SIGINT (Ctrl-C) by [`PflexUp::ctrl_c`],
/// or killed by PID (with every component it recorded) when dropped.
struct PflexUp {
    child: Child,
    log: PathBuf,
    data_dir: PathBuf,
}

impl PflexUp {
    fn start(program: &Path, cwd: &Path, args: &[&str], data_dir: PathBuf) -> PflexUp {
        let log = cwd.join("pflex-up.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start pflex up");
        PflexUp { child, log, data_dir }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !self.output().contains("pflex: ready") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("pflex up exited ({status}) before it was ready:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "pflex up not ready:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// PIDs of components recorded in `logs/pids`, with their names.
    fn recorded(&self) -> Vec<(i32, String)> {
        std::fs::read_to_string(self.data_dir.join("logs/pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (pid, name) = l.split_once(' ')?;
                Some((pid.parse().ok()?, name.to_string()))
            })
            .collect()
    }

    /// Ctrl-C, then: `pflex up` exits and no component it ever recorded
    /// (restarted ones included) is left running.
    async fn ctrl_c(&mut self) {
        let recorded = self.recorded();
        assert!(!recorded.is_empty(), "pflex up recorded no PIDs");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.alive() {
            assert!(Instant::now() < deadline, "pflex up did not stop on Ctrl-C");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (pid, name) in recorded {
            assert!(!running(pid, &name), "{name} (pid {pid}) still runs after Ctrl-C");
        }
    }
}

/// Whether `pid` still runs as the component `name` (not a zombie).
fn running(pid: i32, name: &str) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
    let expected = name.trim_end_matches(|c: char| c.is_ascii_digit());
    !zombie && comm.trim().starts_with(expected)
}

impl Drop for PflexUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (pid, name) in self.recorded() {
            if running(pid, &name) {
                // SAFETY: a PID recorded by the cluster under test, checked
                // just above to still be that component.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The fenced `sh` blocks of one `## ` section of the README, in order.
fn readme_blocks(section: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find(&format!("## {section}\n")).unwrap_or_else(|| {
        panic!("README has no section {section:?}");
    });
    let body = &readme[start + 3..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    let mut blocks = Vec::new();
    let mut rest = body;
    while let Some(open) = rest.find("```sh\n") {
        let after = &rest[open + 6..];
        let close = after.find("```").expect("unclosed code block");
        blocks.push(after[..close].to_string());
        rest = &after[close + 3..];
    }
    blocks
}

/// Undoes what the file-system block sets up, whatever state a failure left.
struct FuseCleanup;

impl Drop for FuseCleanup {
    fn drop(&mut self) {
        let quiet = |cmd: &str| {
            let _ = Command::new("sh").arg("-c").arg(cmd).stderr(Stdio::null()).status();
        };
        quiet("umount /mnt/pflex");
        quiet("for d in $(losetup -j /tmp/pflex-fuse/vol1 -O NAME -n); do losetup -d $d; done");
        quiet("fusermount3 -u /tmp/pflex-fuse");
        // The lab block: its namespaces and processes if the tour stopped
        // half-way (harmless when it ran through).
        let pflex = env!("CARGO_BIN_EXE_pflex");
        quiet(&format!("{pflex} lab down --data-dir /var/tmp/pflex-lab"));
    }
}

fn run_script(cwd: &Path, script: &str, what: &str) {
    let out = Command::new("bash")
        .args(["-euxo", "pipefail", "-c", script])
        .current_dir(cwd)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every block of the README's tour, verbatim, against the README's first
/// command (`./target/release/pflex up` on its default ports and data dir),
/// then Ctrl-C, then the scripts block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tour_runs_as_written() {
    let profile = build_components();
    let work = tempfile::tempdir().unwrap();
    // The tour uses paths relative to a checkout: target/release and fio-jobs.
    std::fs::create_dir_all(work.path().join("target")).unwrap();
    std::os::unix::fs::symlink(&profile, work.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(repo_root().join("fio-jobs"), work.path().join("fio-jobs")).unwrap();
    let _ = std::fs::remove_dir_all("/var/tmp/demo");

    let mut up = PflexUp::start(
        &work.path().join("target/release/pflex"),
        work.path(),
        &["up"],
        work.path().join("pflex-data"),
    );
    up.wait_ready().await;
    let banner = up.output();
    assert!(banner.contains("dashboard https://127.0.0.1:5000"), "no dashboard in:\n{banner}");
    https_only(&work.path().join("pflex-data")).await;
    private_modes(&work.path().join("pflex-data"));
    assert!(banner.contains("pflex-data/mgmt/admin_password"), "no password path in:\n{banner}");
    assert!(banner.contains("fusermount3 -u /tmp/pflex-fuse\n"), "wrong unmount in:\n{banner}");

    let blocks = readme_blocks("A five-minute tour");
    assert!(blocks.len() >= 5, "the tour lost its blocks: {blocks:?}");
    let mut script = String::new();
    for block in &blocks {
        if block.contains("nbd-client") && block.contains("/dev/nbd0") {
            eprintln!(
                "skipping the kernel nbd block: it needs the kernel nbd module (this host's \
                 kernel may have none); vm-images/run-tests.sh runs nbd-client in a QEMU guest"
            );
            continue;
        }
        if block.contains("--detach") {
            continue; // needs the ports of the foreground cluster: run after Ctrl-C
        }
        script.push_str(block);
    }
    let _cleanup = FuseCleanup;
    run_script(work.path(), &script, "the README tour");
    assert!(up.alive(), "pflex up stopped during the tour:\n{}", up.output());
    // pflex up looks at its components twice a second; the tour's last
    // commands may finish sooner than that.
    wait_for("pflex up to report the killed sds2", Duration::from_secs(10), || {
        let out = up.output();
        async move { out.contains("sds2 exited") }
    })
    .await;
    up.ctrl_c().await;

    let detach: Vec<_> = blocks.iter().filter(|b| b.contains("--detach")).collect();
    assert_eq!(detach.len(), 1, "the tour should show `pflex up --detach` once");
    let script = format!("export PATH=$PWD/target/release:$PATH\n{}", detach[0]);
    run_script(work.path(), &script, "the scripts block");
    let _ = std::fs::remove_dir_all("/var/tmp/demo");
}

/// Every file under `dir` (secrets, databases, device images, logs) is
/// its owner's only (no group or other bits), every directory 0700.
fn private_modes(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut seen = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is a directory with mode {mode:o}", path.display());
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        } else if meta.is_file() {
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
            seen += 1;
        }
    }
    for name in [
        "mdm/powerflex.db",
        "mdm/admin_token",
        "sds1/credential",
        "sdc1/credential",
        "sds1/dev0.img",
    ] {
        assert!(dir.join(name).exists(), "{name} missing: the walk must cover it");
    }
    assert!(seen > 10, "only {seen} files under {}", dir.display());
}

/// A client that trusts the cluster CA of the `pflex up` cluster in `data`.
fn cluster_client(data: &Path) -> reqwest::Client {
    let pem = std::fs::read(data.join("tls/ca/ca-cert.pem")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Every HTTP API of a default `pflex up` (MDM, dashboard, SDC control and
/// management, each SDS's control and management port) answers over HTTPS
/// with a certificate from the cluster CA, and nothing in plain HTTP; a
/// client that does not trust that CA gets no answer either.
async fn https_only(data: &Path) {
    let trusted = cluster_client(data);
    let stranger = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let ports = [8001u16, 5000, 8003, 8004, 9100, 9101, 9102, 9200, 9201, 9202];
    for port in ports {
        let path = if port == 8001 { "health/status" } else { "health" };
        let https = format!("https://127.0.0.1:{port}/{path}");
        let reply = trusted.get(&https).send().await;
        assert!(reply.is_ok(), "no HTTPS answer on {port}: {reply:?}");
        let plain = trusted.get(format!("http://127.0.0.1:{port}/{path}")).send().await;
        assert!(plain.is_err(), "port {port} answered plain HTTP: {plain:?}");
        assert!(stranger.get(&https).send().await.is_err(), "port {port}: an untrusted CA passed");
    }
}

/// Sum of an SDC's write operations over every volume, from its metrics.
async fn sdc_writes(http: &reqwest::Client, mgmt_port: u16) -> u64 {
    let Ok(resp) = http.get(format!("https://127.0.0.1:{mgmt_port}/metrics")).send().await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("pflex_sdc_volume_ops_total") && l.contains("op=\"write\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A `kill -9` of one SDS under NBD IO: `pflex up` reports it and keeps
/// serving, IO goes on after the failover, `pflex node start` brings the node
/// back (ACTIVE), and Ctrl-C then stops everything, the restarted node too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sds_leaves_the_cluster_serving() {
    let profile = build_components();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mdm, nbd, sdc) = (free_port(), free_port(), free_port());
    // SDS n uses base+n, base+100+n, base+600+n: pick a base whose ports are free.
    let base = loop {
        let b = 20000 + (free_port() % 20000);
        let free = (0..3u16).all(|n| {
            [b + n, b + 100 + n, b + 600 + n]
                .iter()
                .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        });
        if free && std::net::TcpListener::bind(("127.0.0.1", sdc + 1)).is_ok() {
            break b;
        }
    };
    let args: Vec<String> = vec![
        "up".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--mdm-port".into(),
        mdm.to_string(),
        "--nbd-port".into(),
        nbd.to_string(),
        "--sdc-control-port".into(),
        sdc.to_string(),
        "--sds-base-port".into(),
        base.to_string(),
        "--mgmt-port".into(),
        "0".into(),
        "--device-size".into(),
        "1G".into(),
        "--volume-size".into(),
        "256M".into(),
    ];
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = PflexUp::start(&profile.join("pflex"), dir.path(), &arg_refs, data.clone());
    up.wait_ready().await;

    let uri = format!("nbd://127.0.0.1:{nbd}/vol1");
    let fio = Command::new("fio")
        .args([
            "--name=under-kill",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=256m",
            "--time_based=1",
            "--runtime=40",
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio is installed by test.sh");
    let http = cluster_client(&data);
    wait_for("writes through NBD", Duration::from_secs(30), || async {
        sdc_writes(&http, sdc + 1).await > 100
    })
    .await;

    let (pid, _) = up.recorded().into_iter().find(|(_, n)| n == "sds2").expect("sds2 recorded");
    assert!(running(pid, "sds2"));
    // SAFETY: kill(2) on the PID pflex up recorded for sds2, checked to be it.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let at_kill = sdc_writes(&http, sdc + 1).await;
    wait_for("pflex up to report sds2's death", Duration::from_secs(10), || {
        let out = up.output();
        async move { out.contains("sds2 exited") && out.contains("pflex node start sds2") }
    })
    .await;
    wait_for("writes to go on after the failover", Duration::from_secs(60), || async {
        sdc_writes(&http, sdc + 1).await > at_kill + 2000
    })
    .await;
    assert!(up.alive(), "pflex up stopped after one SDS died:\n{}", up.output());
    let fio_out = fio.wait_with_output().unwrap();
    assert!(
        fio_out.status.success(),
        "fio saw errors:\n{}{}",
        String::from_utf8_lossy(&fio_out.stdout),
        String::from_utf8_lossy(&fio_out.stderr)
    );

    let pflex = |args: &[&str]| {
        Command::new(profile.join("pflex"))
            .args(args)
            .args(["--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let started = pflex(&["node", "start", "sds2"]);
    assert!(
        started.status.success(),
        "pflex node start sds2: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let again = pflex(&["node", "start", "sds2"]);
    assert!(!again.status.success(), "a running node was started twice");
    wait_for("sds2 ACTIVE again", Duration::from_secs(60), || {
        let out = pflex(&["sds", "list", "--json"]);
        async move {
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            list.as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == "sds2" && s["status"] == "ACTIVE")
        }
    })
    .await;
    let info = Command::new("nbdinfo").arg(&uri).output().expect("nbdinfo is installed by test.sh");
    assert!(info.status.success(), "nbdinfo after the restart failed");
    up.ctrl_c().await;
}

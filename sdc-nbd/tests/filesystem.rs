//! ext4 on a pflex volume through nbdfuse and a loop device survives a
//! restart of the whole cluster: files identical, `e2fsck -fn` clean, and
//! both replicas of every written chunk equal.
//!
//! Needs root, /dev/fuse and loop devices; without them the test says so
//! and passes without checking anything else.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pseudo_random, run, run_ok, rw, MIB};
use pflex_testkit::cluster::Cluster;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Why this machine cannot run the test, if it cannot.
fn missing_capability() -> Option<String> {
    let uid = run("id", &["-u"], Duration::from_secs(10));
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} missing"));
        }
    }
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3", "mount", "umount"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// The volume attached as a block device: nbdfuse exposes it as a file,
/// losetup makes it a block device, optionally mounted. Dropping detaches
/// everything in reverse order, also when the test fails.
struct Attached {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mount_dir: Option<PathBuf>,
}

impl Attached {
    fn new(cluster: &Cluster, volume: &str, tag: &str) -> Self {
        let fuse_dir = cluster.path(&format!("fuse-{tag}"));
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let pidfile = cluster.path(&format!("nbdfuse-{tag}.pid"));
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse_dir)
            .arg(cluster.nbd_uri(volume))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting nbdfuse");
        let mut me = Self { fuse_dir, nbdfuse: Some(child), loop_dev: None, mount_dir: None };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pidfile.exists() || !me.fuse_dir.join("nbd").exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not come up");
            if let Some(c) = me.nbdfuse.as_mut() {
                assert!(c.try_wait().unwrap().is_none(), "nbdfuse exited");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let file = me.fuse_dir.join("nbd");
        let dev = run_ok("losetup", &["-f", "--show", file.to_str().unwrap()], TOOL_TIMEOUT);
        me.loop_dev = Some(dev.trim().to_string());
        me
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().unwrap()
    }

    fn mount(&mut self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        run_ok("mount", &[self.dev(), dir.to_str().unwrap()], TOOL_TIMEOUT);
        self.mount_dir = Some(dir.to_path_buf());
    }

    fn detach(&mut self) {
        if let Some(dir) = self.mount_dir.take() {
            let out = run("umount", &[dir.to_str().unwrap()], TOOL_TIMEOUT);
            if !out.status.success() {
                let _ = run("umount", &["-l", dir.to_str().unwrap()], TOOL_TIMEOUT);
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = run("losetup", &["-d", &dev], TOOL_TIMEOUT);
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let _ = run("fusermount3", &["-u", self.fuse_dir.to_str().unwrap()], TOOL_TIMEOUT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A tree of files with pseudo-random contents of many sizes.
fn file_tree() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let sizes = [0usize, 1, 511, 4096, 4097, 65_536, 300_000, 1_048_576, 3_000_001];
    for d in 0..4 {
        for (i, size) in sizes.iter().enumerate() {
            let seed = (d * 100 + i + 1) as u64;
            files.insert(format!("dir{d}/sub{}/file{i}.bin", i % 3), pseudo_random(seed, *size));
        }
    }
    files
}

fn read_tree(root: &Path, names: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    names
        .keys()
        .map(|n| {
            (n.clone(), std::fs::read(root.join(n)).unwrap_or_else(|e| panic!("reading {n}: {e}")))
        })
        .collect()
}

#[tokio::test]
async fn ext4_over_nbdfuse_survives_a_cluster_restart() {
    if let Some(why) = missing_capability() {
        // Under the README's test command (`PFLEX_REQUIRE_TOOLS=1`) a missing
        // tool fails the run; a bare `cargo test` on a laptop may skip.
        assert!(
            std::env::var_os("PFLEX_REQUIRE_TOOLS").is_none(),
            "the ext4 test cannot run: {why}"
        );
        eprintln!("skipping the ext4 test: {why}");
        return;
    }
    let mut cluster = common::start(&[rw("vol1", 256 * MIB)]).await;
    let files = file_tree();
    let mnt = cluster.path("mnt");
    {
        let mut a = Attached::new(&cluster, "vol1", "first");
        run_ok("mkfs.ext4", &["-q", "-F", a.dev()], TOOL_TIMEOUT);
        a.mount(&mnt);
        for (name, data) in &files {
            let path = mnt.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, data).unwrap();
        }
        run_ok("sync", &[], TOOL_TIMEOUT);
        assert!(read_tree(&mnt, &files) == files, "files differ before the restart");
        a.detach();
    }

    cluster.restart_all().await;
    cluster.wait_served(0, &["vol1"]).await;

    let mut a = Attached::new(&cluster, "vol1", "second");
    let fsck = run("e2fsck", &["-fn", a.dev()], TOOL_TIMEOUT);
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    a.mount(&mnt);
    let back = read_tree(&mnt, &files);
    for (name, data) in &files {
        assert!(back[name] == *data, "{name} differs after the restart");
    }
    a.detach();
    let allocated = cluster.check_replicas("vol1", 0..256).await;
    assert!(allocated > 10, "only {allocated} chunks hold data");
}

//! The `mdm` command line: `--help` documents every flag, bad settings stop
//! it with a message.

use std::process::Command;

fn mdm() -> Command {
    let mut command = Command::new(pflex_testkit::workspace_binary("mdm", "mdm"));
    command.env_remove("PFLEX_JOIN_KEY");
    command
}

#[test]
fn help_lists_every_flag() {
    let out = mdm().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--data-dir",
        "--join-key-file",
        "--join-key",
        "--heartbeat-interval-secs",
        "--stale-after-secs",
        "--failed-after-secs",
        "--token-ttl-secs",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}:\n{help}");
    }
}

#[test]
fn refuses_to_start_with_an_empty_join_key_or_bad_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mdm");
    let out = mdm()
        .args(["--listen", "127.0.0.1:0", "--join-key", "k", "--stale-after-secs", "60"])
        .args(["--failed-after-secs", "30", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be below"));
    let empty = dir.path().join("empty_key");
    std::fs::write(&empty, "  \n").unwrap();
    let out = mdm()
        .args(["--listen", "127.0.0.1:0", "--join-key-file"])
        .arg(&empty)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

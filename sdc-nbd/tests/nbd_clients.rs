//! End-to-end tests of the SDC with real NBD clients (libnbd's nbdinfo and
//! nbdcopy, qemu-io, fio) against a real cluster: MDM, three SDS and the
//! SDC as separate processes.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::{pseudo_random, run, run_ok, rw, VolumeSpec, MIB};
use pflex_proto::token::AccessMode;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn nbdinfo_reports_size_flags_and_every_mapped_volume() {
    let cluster = common::start(&[
        rw("vol1", 3 * 1024 * MIB),
        VolumeSpec { name: "archive", size: 256 * MIB, mode: AccessMode::ReadOnly },
    ])
    .await;
    let out = run_ok("nbdinfo", &["--json", &cluster.nbd_uri("vol1")], TOOL_TIMEOUT);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &json["exports"][0];
    assert_eq!(e["export-name"], "vol1");
    assert_eq!(e["export-size"], 3 * 1024 * MIB);
    for key in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_multi_conn",
    ] {
        assert_eq!(e[key], true, "{key}: {out}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert!(e["contexts"].as_array().unwrap().iter().any(|c| c == "base:allocation"), "{out}");

    let out = run_ok("nbdinfo", &["--json", &cluster.nbd_uri("archive")], TOOL_TIMEOUT);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["exports"][0]["is_read_only"], true, "{out}");
    assert_eq!(json["exports"][0]["export-size"], 256 * MIB);

    let list_uri = format!("nbd://127.0.0.1:{}", cluster.sdc(0).data_port);
    let out = run_ok("nbdinfo", &["--list", "--json", &list_uri], TOOL_TIMEOUT);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<&str> = json["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["archive", "vol1"]);

    // A fresh volume is all holes.
    let out = run_ok("nbdinfo", &["--map", &cluster.nbd_uri("vol1")], TOOL_TIMEOUT);
    assert!(out.contains("hole,zero") && !out.contains("data"), "{out}");
}

#[tokio::test]
async fn qemu_io_patterns_unaligned_and_across_chunks_read_back_exactly() {
    let cluster = common::start(&[rw("vol1", 64 * MIB)]).await;
    let uri = cluster.nbd_uri("vol1");
    let commands = [
        // Unaligned, across the first chunk boundary.
        "write -P 0xab 1048000 5000",
        "read -P 0xab 1048000 5000",
        // Tiny writes at odd offsets inside and across boundaries.
        "write -P 0x11 1 1",
        "write -P 0x12 2097151 2",
        "read -P 0x12 2097151 2",
        "read -P 0 0 1",
        "read -P 0x11 1 1",
        // Large write spanning four chunks.
        "write -P 0x5a 3145000 4200000",
        "read -P 0x5a 3145000 4200000",
        // Write zeroes, with and without allocation, unaligned and whole chunks.
        "write -z 1048100 1000",
        "read -P 0 1048100 1000",
        "read -P 0xab 1048000 100",
        "read -P 0xab 1049100 3900",
        "write -z 4194304 1048576",
        "read -P 0 4194304 1048576",
        // FUA write.
        "write -f -P 0x77 10000000 12345",
        "read -P 0x77 10000000 12345",
        // Discard of a whole chunk, then flush.
        "discard 20971520 1048576",
        "flush",
        "read -P 0 20971520 1048576",
        // Last bytes of the volume.
        "write -P 0xee 67108860 4",
        "read -P 0xee 67108860 4",
    ];
    let mut args: Vec<&str> = vec!["-f", "raw", &uri];
    for c in &commands {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok("qemu-io", &args, TOOL_TIMEOUT);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    // Out of range is refused, and the connection survives for the next command.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "read 67108860 8"], TOOL_TIMEOUT);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("out of range") || text.contains("Invalid") || !out.status.success(),
        "{text}"
    );

    let allocated = cluster.check_replicas("vol1", 0..64).await;
    assert!(allocated >= 5, "only {allocated} chunks hold data");

    // Block status: written chunks are data, never-written (and discarded) ones holes.
    let out = run_ok("nbdinfo", &["--map", "--json", &uri], TOOL_TIMEOUT);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let state_at = |offset: u64| -> String {
        extents
            .iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= offset && offset < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["description"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no extent covers {offset}: {out}"))
    };
    assert_eq!(state_at(0), "data", "{out}");
    assert_eq!(state_at(3 * MIB + 100), "data", "{out}");
    assert_eq!(state_at(20 * MIB + 5), "hole,zero", "{out}");
    assert_eq!(state_at(40 * MIB), "hole,zero", "{out}");
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 64 * MIB);
}

#[tokio::test]
async fn nbdcopy_with_four_connections_copies_64_mib_both_ways() {
    let cluster = common::start(&[rw("vol1", 128 * MIB)]).await;
    let uri = cluster.nbd_uri("vol1");
    let src = cluster.path("src.img");
    let back = cluster.path("back.img");
    let data = pseudo_random(0xc0ffee, 64 * MIB as usize);
    std::fs::File::create(&src).unwrap().write_all(&data).unwrap();
    run_ok("nbdcopy", &["--connections=4", "--flush", src.to_str().unwrap(), &uri], TOOL_TIMEOUT);
    // The whole volume comes back: the copy, then zeroes.
    run_ok("nbdcopy", &["--connections=4", &uri, back.to_str().unwrap()], TOOL_TIMEOUT);
    let copied = std::fs::read(&back).unwrap();
    assert_eq!(copied.len() as u64, 128 * MIB);
    assert!(copied[..data.len()] == data[..], "64 MiB read back differs from what was written");
    assert!(copied[data.len()..].iter().all(|&b| b == 0), "tail beyond the copy is not zero");
    assert_eq!(cluster.check_replicas("vol1", 0..128).await, 64);
}

#[tokio::test]
async fn fio_random_writes_of_mixed_sizes_verify_at_queue_depth_32() {
    let cluster = common::start(&[rw("vol1", 256 * MIB)]).await;
    let uri = cluster.nbd_uri("vol1");
    let uri_arg = format!("--uri={uri}");
    let out = run_ok(
        "fio",
        &[
            "--name=randwrite-verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bssplit=4k/40:16k/20:64k/20:256k/10:1m/10",
            "--iodepth=32",
            "--size=128M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=json",
        ],
        TOOL_TIMEOUT,
    );
    let start = out.find('{').expect("fio JSON");
    let json: serde_json::Value = serde_json::from_str(&out[start..]).unwrap();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0);
    assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0, "fio verified nothing");
    assert!(cluster.check_replicas("vol1", 0..256).await > 0);
}

#!/usr/bin/env bash
# The kernel-NBD tests: a QEMU guest running Debian's kernel is the NBD client of a volume that
# the host serves on 127.0.0.1:10829, reached from the guest as 10.0.2.2 via user-mode networking.
#
# Installs what is missing (QEMU from bookworm-backports, cpio, libnbd-bin, nbdkit, fuse3,
# e2fsprogs), builds the guest when it is missing or stale, starts the server, then:
#   kernel-nbd-b4096  nbd-client -b 4096, mkfs.ext4, mount, file tree with checksums, read-back
#                     through NBD, fio verify on a file and on the raw region past the file
#                     system, fsync-per-write job, umount, e2fsck, disconnect
#   kernel-nbd-c2     the same with two connections (-C 2) on the same file system: the first
#                     test's files must still match, and it adds its own
#   host-verify       the host reads the volume through nbdfuse + a loop device and finds both
#                     trees with the checksums the guests printed
#   kernel-nbd-tls    (pflex) the same over TLS: nbd-client -certfile/-keyfile/-cacertfile with the
#                     NBD client certificate `pflex up` issued; the SDC must count a TLS session
#   kernel-nbd-bench  (PFLEX_VM_BENCH=1) the fio-jobs/blockdev benchmarks on the region past the
#                     file system, PFLEX_FIO_SECONDS each
# and prints "PASS|FAIL name (Ns)" per test. Console logs, server logs and the request summary
# are kept in vm-images/artifacts/. Every VM and process started here is stopped by PID on exit.
#
# Environment:
#   PFLEX_NBD_SERVER   pflex (default: `pflex up`, built with cargo), nbdkit (memory plugin with
#                      the request log filter) or qemu-nbd (on a sparse file)
#   PFLEX_NBD_PORT     NBD port on 127.0.0.1 (default 10829, beside a `pflex up` on the default
#                      ports); the export is always vol1. The cluster's other ports: MDM 8021,
#                      SDC 8023/8024, SDS 9130+n/9230+n/9730+n
#   PFLEX_CARGO_PROFILE  release (default) or debug, for the pflex binaries
#   PFLEX_VM_ACCEL     kvm, tcg, or auto (default: probe KVM with a real boot, else TCG)
#   PFLEX_VM_BENCH=1   also run the benchmark guest;  PFLEX_FIO_SECONDS  seconds per job (10)
#   PFLEX_VM_TEST_TIMEOUT  seconds before a guest is stopped (default 900)
#   PFLEX_NBDKIT_ERROR_RATE  with nbdkit: fail this share of requests with EIO (e.g. 1%), to see
#                      the tests fail and name the step
set -euo pipefail

LOG_PREFIX=run-tests
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SERVER_KIND=${PFLEX_NBD_SERVER:-pflex}
NBD_PORT=${PFLEX_NBD_PORT:-10829}
EXPORT=vol1
NBD_URI=nbd://127.0.0.1:$NBD_PORT/$EXPORT
SDC_MGMT_PORT=$((${PFLEX_SDC_CONTROL_PORT:-8023} + 1))
CARGO_PROFILE=${PFLEX_CARGO_PROFILE:-release}
TEST_TIMEOUT=${PFLEX_VM_TEST_TIMEOUT:-900}
[ "$(id -u)" = 0 ] || die "run as root (it installs packages, uses loop devices and mounts)"

run_started=$(date +%s)
mkdir -p "$ARTIFACTS_DIR"
rm -rf "$ARTIFACTS_DIR"/*.log "$ARTIFACTS_DIR"/*.txt "$ARTIFACTS_DIR/pflex-logs"
WORK_DIR=$(mktemp -d /var/tmp/pflex-vm-tests.XXXXXX)

# --- Processes and mounts this run owns, released in the EXIT trap. ----------------------------
declare -A owned_pids=() # pid -> name
host_mount=
host_loop=
fuse_mount=

start_owned() { # start_owned NAME LOGFILE COMMAND...: runs COMMAND in the background.
  local name=$1 logfile=$2
  shift 2
  "$@" >"$logfile" 2>&1 </dev/null &
  owned_pids[$!]=$name
  LAST_PID=$!
}

stop_pid() { # stop_pid PID: SIGTERM, then SIGKILL after 10 s; reaps it.
  local pid=$1 waited=0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 100 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "${owned_pids[$pid]:-process} (pid $pid) ignored SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  unset "owned_pids[$pid]"
}

release_host_mounts() {
  if [ -n "$host_mount" ]; then
    umount "$host_mount" 2>/dev/null || true
    host_mount=
  fi
  if [ -n "$host_loop" ]; then
    losetup -d "$host_loop" 2>/dev/null || true
    host_loop=
  fi
  if [ -n "$fuse_mount" ]; then
    fusermount3 -u "$fuse_mount" 2>/dev/null || umount -l "$fuse_mount" 2>/dev/null || true
    fuse_mount=
  fi
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  release_host_mounts
  local pid
  for pid in "${!owned_pids[@]}"; do
    stop_pid "$pid"
  done
  if [ -d "$WORK_DIR/pflex-data/logs" ]; then
    mkdir -p "$ARTIFACTS_DIR/pflex-logs"
    cp "$WORK_DIR"/pflex-data/logs/*.log "$ARTIFACTS_DIR/pflex-logs/" 2>/dev/null || true
  fi
  rm -rf "$WORK_DIR"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Results. -----------------------------------------------------------------------------------
declare -a result_lines=()
failures=0
record() { # record PASS|FAIL NAME SECONDS [DETAIL...]
  local line="$1 $2 ($3s)"
  shift 3
  result_lines+=("$line")
  printf '%s\n' "$line"
  local detail
  for detail in "$@"; do
    printf '    %s\n' "$detail"
  done
  case $line in FAIL*) failures=$((failures + 1)) ;; esac
}

# --- 1. Host tools, guest build, KVM probe. ------------------------------------------------------
install_host_tools
"$VM_IMAGES_DIR/build-guest.sh" --if-needed

kvm_probe_pid=
if [ -n "${PFLEX_VM_ACCEL:-}" ] && [ "$PFLEX_VM_ACCEL" != auto ]; then
  accel=$PFLEX_VM_ACCEL
elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  # Probed while the server starts: a guest that finishes its smoke test under KVM in time.
  start_owned kvm-probe "$ARTIFACTS_DIR/kvm-probe.qemu.log" \
    "$VM_IMAGES_DIR/boot-guest.sh" --accel kvm --test smoke \
    --timeout "${PFLEX_KVM_PROBE_SECS:-15}" --log "$ARTIFACTS_DIR/kvm-probe.console.log"
  kvm_probe_pid=$LAST_PID
  accel=
else
  accel=tcg
fi

# --- 2. The NBD server. -------------------------------------------------------------------------
nbd_serves() { nbdinfo --size "$NBD_URI" >/dev/null 2>&1; }
if nbd_serves || (exec 3<>"/dev/tcp/127.0.0.1/$NBD_PORT") 2>/dev/null; then
  die "something already listens on 127.0.0.1:$NBD_PORT; stop it or set PFLEX_NBD_PORT"
fi

server_log=$ARTIFACTS_DIR/server.log
request_log=
case $SERVER_KIND in
  pflex)
    log "building the pflex binaries ($CARGO_PROFILE)"
    profile_flag=()
    [ "$CARGO_PROFILE" = release ] && profile_flag=(--release)
    (cd "$REPO_DIR" && cargo build "${profile_flag[@]}" -p tools -p mdm -p sds-uring -p sdc-nbd --bins) ||
      die "cargo build failed"
    target_dir=${CARGO_TARGET_DIR:-$REPO_DIR/target}
    pflex_bin=$target_dir/$CARGO_PROFILE/pflex
    [ -x "$pflex_bin" ] || die "no pflex binary at $pflex_bin"
    start_owned pflex-up "$server_log" "$pflex_bin" up --data-dir "$WORK_DIR/pflex-data" \
      --nbd-port "$NBD_PORT" --sdc-control-port "${PFLEX_SDC_CONTROL_PORT:-8023}" --mgmt-port 0 \
      --mdm-port "${PFLEX_MDM_PORT:-8021}" --sds-base-port "${PFLEX_SDS_BASE_PORT:-9130}"
    server_pid=$LAST_PID
    ;;
  nbdkit)
    request_log=$ARTIFACTS_DIR/nbd-requests.log
    fault=()
    if [ -n "${PFLEX_NBDKIT_ERROR_RATE:-}" ]; then
      # Fault injection: a share of the requests fail with EIO, so the tests must report FAIL.
      fault=(--filter=error "error-rate=$PFLEX_NBDKIT_ERROR_RATE")
    fi
    start_owned nbdkit "$server_log" nbdkit --foreground --verbose --ipaddr 127.0.0.1 \
      --port "$NBD_PORT" --exportname "$EXPORT" --filter=log "${fault[@]:0:1}" \
      memory "${PFLEX_NBDKIT_SIZE:-2G}" "logfile=$request_log" "${fault[@]:1}"
    server_pid=$LAST_PID
    ;;
  qemu-nbd)
    truncate -s "${PFLEX_NBDKIT_SIZE:-2G}" "$WORK_DIR/vol1.img"
    start_owned qemu-nbd "$server_log" qemu-nbd --format=raw --export-name="$EXPORT" \
      --bind=127.0.0.1 --port="$NBD_PORT" --shared=8 --persistent --cache=none --aio=native \
      "$WORK_DIR/vol1.img"
    server_pid=$LAST_PID
    ;;
  *) die "PFLEX_NBD_SERVER must be pflex, nbdkit or qemu-nbd, not $SERVER_KIND" ;;
esac

server_started=$(date +%s)
until nbd_serves; do
  kill -0 "$server_pid" 2>/dev/null || {
    tail -n 30 "$server_log" >&2
    die "$SERVER_KIND exited before serving $NBD_URI (log: $server_log)"
  }
  [ $(($(date +%s) - server_started)) -lt "${PFLEX_SERVER_READY_SECS:-180}" ] ||
    die "$SERVER_KIND does not serve $NBD_URI after ${PFLEX_SERVER_READY_SECS:-180} s"
  sleep 0.2
done
log "$SERVER_KIND serves $NBD_URI ($(nbdinfo --size "$NBD_URI") bytes) after $(($(date +%s) - server_started)) s"

if [ -n "$kvm_probe_pid" ]; then
  stop_pid_when_done() { wait "$1" 2>/dev/null || true; unset "owned_pids[$1]"; }
  stop_pid_when_done "$kvm_probe_pid"
  if grep -aq 'PFLEX-TEST smoke PASS' "$ARTIFACTS_DIR/kvm-probe.console.log"; then
    accel=kvm
  else
    accel=tcg
  fi
fi
log "guests run with $accel acceleration"

# --- 3. Guest tests. ----------------------------------------------------------------------------
# sdc_request_summary BEFORE AFTER: NBD requests, bytes and average size per command that the SDC
# counted between two /metrics snapshots (BEFORE may be empty: counting from zero).
previous_sdc_metrics=
sdc_request_summary() {
  awk '
    function key(line) { sub(/^[^{]*\{op="/, "", line); sub(/".*/, "", line); return line }
    FNR == 1 { file++ }
    /^pflex_sdc_nbd_requests_total\{/ { requests[file, key($1)] = $2; ops[key($1)] = 1 }
    /^pflex_sdc_nbd_bytes_total\{/ { bytes[file, key($1)] = $2 }
    END {
      last = file
      first = (last == 2) ? 1 : 0
      for (op in ops) {
        n = requests[last, op] - requests[first, op]
        if (n <= 0) continue
        b = bytes[last, op] - bytes[first, op]
        printf "%-13s requests=%d bytes=%d avg=%.0fB\n", op, n, b, b / n
      }
    }' "$@"
}

# run_guest NAME EXPECTED_STEPS BOOT_ARGS...: boots a guest, checks its markers, records a result.
run_guest() {
  local name=$1 expected=$2
  shift 2
  local console=$ARTIFACTS_DIR/$name.console.log started request_line=0
  [ -n "$request_log" ] && [ -f "$request_log" ] && request_line=$(wc -l <"$request_log")
  started=$(date +%s)
  start_owned "$name" "$ARTIFACTS_DIR/$name.qemu.log" "$VM_IMAGES_DIR/boot-guest.sh" \
    --accel "$accel" --timeout "$TEST_TIMEOUT" --log "$console" "$@"
  local pid=$LAST_PID qemu_status=0
  wait "$pid" || qemu_status=$?
  unset "owned_pids[$pid]"
  local secs=$(($(date +%s) - started)) details=() step
  for step in $expected; do
    if grep -aq "PFLEX-STEP $step OK" "$console"; then
      continue
    elif grep -aq "PFLEX-STEP $step FAIL" "$console"; then
      details+=("step $step failed")
    else
      details+=("step $step did not report")
    fi
    break
  done
  if [ "$qemu_status" = 124 ]; then
    details+=("the guest was stopped after ${TEST_TIMEOUT} s")
  elif [ "$qemu_status" != 0 ]; then
    details+=("qemu exited with status $qemu_status (see $name.qemu.log)")
  fi
  grep -aq "PFLEX-TEST .* PASS" "$console" || details+=("the guest did not report PASS")
  # The kernel can recover from some NBD trouble on its own (timeouts, requeued requests) and
  # let the steps pass; any such message still fails the test.
  local kernel_trouble
  kernel_trouble=$(grep -aE "$KERNEL_TROUBLE" "$console" | head -n 3 || true)
  [ -z "$kernel_trouble" ] || details+=("the guest kernel reported: $kernel_trouble")
  if [ -n "$request_log" ] && [ -f "$request_log" ]; then
    "$VM_IMAGES_DIR/summarize-nbd-log.sh" "$request_log" "$request_line" \
      >"$ARTIFACTS_DIR/$name.requests.txt" || true
  fi
  if [ "$SERVER_KIND" = pflex ]; then
    # The SDC's counters (NBD commands, request sizes, flushes) after this guest.
    # `pflex up` serves HTTPS with its cluster CA.
    curl -fsS --max-time 5 --cacert "$WORK_DIR/pflex-data/tls/ca/ca-cert.pem" \
      "https://127.0.0.1:$SDC_MGMT_PORT/metrics" \
      >"$ARTIFACTS_DIR/$name.sdc-metrics.txt" 2>&1 || true
    sdc_request_summary ${previous_sdc_metrics:+"$previous_sdc_metrics"} \
      "$ARTIFACTS_DIR/$name.sdc-metrics.txt" \
      >"$ARTIFACTS_DIR/$name.requests.txt" || true
    previous_sdc_metrics=$ARTIFACTS_DIR/$name.sdc-metrics.txt
  fi
  if ((${#details[@]})); then
    details+=("console: $console")
    record FAIL "$name" "$secs" "${details[@]}"
    return 1
  fi
  record PASS "$name" "$secs"
}

KERNEL_TROUBLE='I/O error|blk_update_request|nbd[0-9]+: .*(timed out|failed|[Dd]ead|error)'
KERNEL_TROUBLE+='|EXT4-fs (error|warning)|WARNING:|BUG:|Call Trace|Oops'
fs_steps="nbd-connect mount write-tree read-back fio-file-verify fio-device-verify fio-fsync"
fs_steps+=" umount-fsck nbd-disconnect"
common=(--set "server=10.0.2.2" --set "port=$NBD_PORT" --set "export=$EXPORT")

b4096_ok=true
run_guest kernel-nbd-b4096 "modules network nbd-connect mkfs $fs_steps" --test nbd-ext4 \
  "${common[@]}" --set block=4096 --set conns=1 --set mkfs=1 --set tree=b4096 || b4096_ok=false

c2_ok=false
if $b4096_ok; then
  c2_ok=true
  run_guest kernel-nbd-c2 "modules network nbd-connect mount check-b4096 ${fs_steps#nbd-connect mount }" \
    --test nbd-ext4 "${common[@]}" --set block=4096 --set conns=2 --set mkfs=0 --set tree=c2 \
    --set check_tree=b4096 || c2_ok=false
else
  record FAIL kernel-nbd-c2 0 "not run: it works on the file system kernel-nbd-b4096 makes"
fi

# --- 4. The host reads the same volume through nbdfuse + loop and checks every sum. ------------
host_verify() {
  local dir=$WORK_DIR/host-verify sums=$WORK_DIR/host-verify.sha256 console
  mkdir -p "$dir/fuse" "$dir/fs"
  : >"$sums"
  for console in "$@"; do
    grep -a '^PFLEX-SUM ' "$console" | sed 's/^PFLEX-SUM //' >>"$sums"
  done
  [ -s "$sums" ] || {
    echo "no PFLEX-SUM lines in the guest consoles"
    return 1
  }
  start_owned nbdfuse "$ARTIFACTS_DIR/nbdfuse.log" nbdfuse --readonly "$dir/fuse/$EXPORT" "$NBD_URI"
  local fuse_pid=$LAST_PID waited=0
  fuse_mount=$dir/fuse
  until [ -e "$dir/fuse/$EXPORT" ] && mountpoint -q "$dir/fuse"; do
    kill -0 "$fuse_pid" 2>/dev/null || {
      echo "nbdfuse exited"
      return 1
    }
    [ "$waited" -lt 300 ] || {
      echo "nbdfuse did not mount in 30 s"
      return 1
    }
    sleep 0.1
    waited=$((waited + 1))
  done
  host_loop=$(losetup --find --show --read-only "$dir/fuse/$EXPORT") || return 1
  mount -t ext4 -o ro,noload "$host_loop" "$dir/fs" || return 1
  host_mount=$dir/fs
  echo "$(wc -l <"$sums") files to check"
  (cd "$dir/fs" && sha256sum --check --quiet "$sums") || return 1
  echo "all sums match"
  umount "$dir/fs" && host_mount=
  losetup -d "$host_loop" && host_loop=
  fusermount3 -u "$dir/fuse" && fuse_mount=
  stop_pid "$fuse_pid"
}

if $b4096_ok; then
  started=$(date +%s)
  consoles=("$ARTIFACTS_DIR/kernel-nbd-b4096.console.log")
  $c2_ok && consoles+=("$ARTIFACTS_DIR/kernel-nbd-c2.console.log")
  if host_verify "${consoles[@]}" >"$ARTIFACTS_DIR/host-verify.log" 2>&1; then
    record PASS host-verify $(($(date +%s) - started))
  else
    release_host_mounts
    record FAIL host-verify $(($(date +%s) - started)) "$(tail -n 5 "$ARTIFACTS_DIR/host-verify.log")"
  fi
else
  record FAIL host-verify 0 "not run: no file system was written"
fi

# --- 4b. NBD over TLS (pflex): nbd-client starts TLS with the client certificate `pflex up` issued,
# given to the guest in an archive appended to its initramfs; the SDC must count a TLS session.
if [ "$SERVER_KIND" = pflex ] && $b4096_ok; then
  tls_root=$WORK_DIR/tls-initrd
  mkdir -p "$tls_root/etc/pflex-tls"
  for f in ca-cert.pem client-cert.pem client-key.pem; do
    cp "$WORK_DIR/pflex-data/tls/nbd-client/$f" "$tls_root/etc/pflex-tls/"
  done
  (cd "$tls_root" && find . | cpio -o -H newc --quiet) >"$WORK_DIR/tls.cpio"
  # The kernel finds the appended archive only on a 4-byte boundary after the compressed one
  # (it skips zero padding between archives): pad the built image to 512 bytes first.
  cp "$BUILD_DIR/initramfs.img" "$WORK_DIR/initramfs-tls.img"
  size=$(stat -c %s "$WORK_DIR/initramfs-tls.img")
  head -c $(((512 - size % 512) % 512)) /dev/zero >>"$WORK_DIR/initramfs-tls.img"
  cat "$WORK_DIR/tls.cpio" >>"$WORK_DIR/initramfs-tls.img"
  if run_guest kernel-nbd-tls "modules network nbd-connect mount check-b4096 ${fs_steps#nbd-connect mount }" \
    --test nbd-ext4 --initrd "$WORK_DIR/initramfs-tls.img" "${common[@]}" --set tls=1 \
    --set block=4096 --set conns=1 --set mkfs=0 --set tree=tls --set check_tree=b4096; then
    tls_sessions=$(sed -n 's/^pflex_sdc_nbd_tls_sessions_total //p' \
      "$ARTIFACTS_DIR/kernel-nbd-tls.sdc-metrics.txt" 2>/dev/null)
    if [ "${tls_sessions:-0}" -lt 1 ]; then
      record FAIL kernel-nbd-tls-counted 0 "the SDC counted no TLS session (${tls_sessions:-none})"
    else
      record PASS kernel-nbd-tls-counted 0
    fi
  fi
fi

# --- 5. Benchmarks (optional). ------------------------------------------------------------------
if [ "${PFLEX_VM_BENCH:-0}" = 1 ]; then
  run_guest kernel-nbd-bench "modules network nbd-connect bench nbd-disconnect" --test bench \
    "${common[@]}" --set block=4096 --set conns="${PFLEX_BENCH_CONNS:-1}" \
    --set fio_seconds="${PFLEX_FIO_SECONDS:-10}" || true
fi

# --- 6. Summary. --------------------------------------------------------------------------------
{
  echo "server $SERVER_KIND, accel $accel, total $(($(date +%s) - run_started)) s"
  printf '%s\n' "${result_lines[@]}"
  echo
  echo "fio inside the guests (IOPS, KiB/s):"
  grep -ah '^PFLEX-FIO ' "$ARTIFACTS_DIR"/kernel-nbd-*.console.log 2>/dev/null || true
  echo
  echo "kernel block-layer counters at disconnect:"
  grep -ah '^PFLEX-INFO \(device\|block_stats\)' "$ARTIFACTS_DIR"/kernel-nbd-*.console.log 2>/dev/null || true
  for summary in "$ARTIFACTS_DIR"/*.requests.txt; do
    [ -s "$summary" ] || continue
    echo
    echo "NBD requests seen by the server during $(basename "$summary" .requests.txt):"
    cat "$summary"
  done
} >"$ARTIFACTS_DIR/summary.txt"
passed=$((${#result_lines[@]} - failures))
log "server $SERVER_KIND, accel $accel, $(($(date +%s) - run_started)) s in all; logs in $ARTIFACTS_DIR"
echo "run-tests: $passed passed, $failures failed"
[ "$failures" = 0 ]

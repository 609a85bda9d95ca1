#!/bin/sh
# Guest test: the kernel NBD client on a pflex volume with ext4 on top.
#
# Connects /dev/nbd0 with nbd-client (block size PFLEX_BLOCK, PFLEX_CONNS connections), makes an
# ext4 file system on the first half of the device (PFLEX_MKFS=1) or checks the one a previous run
# left (PFLEX_CHECK_TREE: that run's tree must still match its checksums), writes a file tree
# PFLEX_TREE with known SHA-256 sums (printed as PFLEX-SUM lines for the host to verify later),
# drops the page cache and reads it all back through NBD, runs fio verify jobs on a file in the
# file system and on the raw device region past the file system, runs an fsync-per-write job
# (FLUSH/FUA heavy), then unmounts, checks the file system with e2fsck and disconnects.
#
# Settings (kernel command line pflex.KEY=VALUE -> PFLEX_KEY): server, port, export, block, conns,
# mkfs, tree, check_tree, verify_mib.
# The functions below run through step(), which shellcheck cannot follow.
# shellcheck disable=SC2317
# shellcheck source=../lib.sh
. /usr/share/pflex/lib.sh

SERVER=${PFLEX_SERVER:-10.0.2.2}
PORT=${PFLEX_PORT:-10809}
EXPORT=${PFLEX_EXPORT:-vol1}
BLOCK=${PFLEX_BLOCK:-4096}
CONNS=${PFLEX_CONNS:-1}
MKFS=${PFLEX_MKFS:-1}
TREE=${PFLEX_TREE:-tree}
CHECK_TREE=${PFLEX_CHECK_TREE:-}
VERIFY_MIB=${PFLEX_VERIFY_MIB:-32}
DEV=/dev/nbd0
MNT=/mnt/pflex
JOBS=/usr/share/pflex/fio-jobs

TLS=${PFLEX_TLS:-0}
# With PFLEX_TLS=1 nbd-client starts TLS (STARTTLS, x509) with the NBD client certificate the host
# put in /etc/pflex-tls (an extra initramfs archive); the SDC's certificate names localhost.
TLS_DIR=/etc/pflex-tls

connect() {
  set -- "$SERVER" "$PORT" "$DEV" -N "$EXPORT" -b "$BLOCK" -C "$CONNS"
  if [ "$TLS" = 1 ]; then
    set -- "$@" -cacertfile "$TLS_DIR/ca-cert.pem" -certfile "$TLS_DIR/client-cert.pem" \
      -keyfile "$TLS_DIR/client-key.pem" -tlshostname localhost
  fi
  /usr/sbin/nbd-client "$@" || return 1
  # The size appears once the kernel has the device configured (up to 30 s on a busy host).
  tries=0
  while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || return 1
    sleep 0.1
  done
  q=/sys/block/nbd0/queue
  info device "size_bytes=$(($(cat /sys/block/nbd0/size) * 512))" \
    "logical_block=$(cat "$q"/logical_block_size)" "physical_block=$(cat "$q"/physical_block_size)" \
    "max_sectors_kb=$(cat "$q"/max_sectors_kb)" "max_hw_sectors_kb=$(cat "$q"/max_hw_sectors_kb)" \
    "write_cache=$(tr ' ' '_' <"$q"/write_cache)" "fua=$(cat "$q"/fua 2>/dev/null)" \
    "discard_max_bytes=$(cat "$q"/discard_max_bytes)" \
    "write_zeroes_max_bytes=$(cat "$q"/write_zeroes_max_bytes)" \
    "nr_requests=$(cat "$q"/nr_requests)" "hw_queues=$(find /sys/block/nbd0/mq -mindepth 1 -maxdepth 1 | wc -l)" \
    "connections=$CONNS"
  # The kernel gives each connection its own hardware queue: proof that -C took effect.
  hw_queues=$(find /sys/block/nbd0/mq -mindepth 1 -maxdepth 1 | wc -l)
  if [ "$hw_queues" != "$CONNS" ]; then
    echo "nbd0 has $hw_queues hardware queues, expected one per connection ($CONNS)"
    return 1
  fi
}

# fs_bytes: the size of the ext4 file system on the device (from its superblock).
fs_bytes() {
  /usr/sbin/dumpe2fs -h "$DEV" 2>/dev/null | awk -F: '
    /^Block count/ { count = $2 + 0 } /^Block size/ { size = $2 + 0 }
    END { if (count && size) print count * size; else exit 1 }'
}

make_fs() {
  device_bytes=$(($(cat /sys/block/nbd0/size) * 512))
  fs_kib=$((device_bytes / 2 / 1024))
  # mke2fs discards the device first: the kernel sends that as NBD TRIM.
  /usr/sbin/mke2fs -t ext4 -F -q -L pflex -b 4096 "$DEV" "${fs_kib}k"
}

mount_fs() {
  mkdir -p "$MNT" && mount -t ext4 "$DEV" "$MNT"
}

# write_tree DIR: files of awkward and large sizes plus many small ones, then their sums.
write_tree() {
  dir=$MNT/$TREE
  rm -rf "$dir"
  mkdir -p "$dir/small" "$dir/sizes" "$dir/deep/a/b/c" || return 1
  for size in 0 1 511 4095 4096 4097 65537 1048576 3145851; do
    head -c "$size" /dev/urandom >"$dir/sizes/f$size" || return 1
  done
  head -c 16777216 /dev/urandom >"$dir/big-16m" || return 1
  i=0
  while [ "$i" -lt 200 ]; do
    head -c $((1000 + i * 37)) /dev/urandom >"$dir/small/s$i" || return 1
    i=$((i + 1))
  done
  echo "written by the kernel NBD client, $CONNS connection(s), block size $BLOCK" \
    >"$dir/deep/a/b/c/note.txt"
  sync || return 1
  # shellcheck disable=SC2094 # MANIFEST is left out of the list it is written from
  (cd "$dir" && find . -type f ! -name MANIFEST | sort | xargs sha256sum >MANIFEST) || return 1
  sync || return 1
  sed "s|  \./|  $TREE/|" "$dir/MANIFEST" | sed 's/^/PFLEX-SUM /'
  info tree "$TREE files=$(wc -l <"$dir/MANIFEST") bytes=$(du -sk "$dir" | cut -f1)KiB"
}

# read_back TREE: drops the page cache so the sums are computed from data read through NBD.
read_back() {
  sync && echo 3 >/proc/sys/vm/drop_caches || return 1
  (cd "$MNT/$1" && sha256sum -c -s MANIFEST)
}

fio_file_verify() {
  mkdir -p "$MNT/$TREE/fio" || return 1
  fio_job "$JOBS/verify-4k-randwrite.fio" /tmp/verify-file.fio \
    "filename=$MNT/$TREE/fio/verify-4k.dat" "offset=0" "size=${VERIFY_MIB}M" &&
    run_fio verify-file /tmp/verify-file.fio
}

fio_device_verify() {
  fs_end=$(fs_bytes) || return 1
  device_bytes=$(($(cat /sys/block/nbd0/size) * 512))
  region=$((VERIFY_MIB * 1048576 * 2))
  [ $((fs_end + region)) -le "$device_bytes" ] || region=$((device_bytes - fs_end))
  [ "$region" -ge 2097152 ] || return 1
  info region "device=$device_bytes fs_end=$fs_end verify_bytes=$region"
  half=$((region / 2))
  fio_job "$JOBS/verify-4k-randwrite.fio" /tmp/verify-dev-4k.fio \
    "filename=$DEV" "offset=$fs_end" "size=$half" &&
    run_fio verify-device-4k /tmp/verify-dev-4k.fio &&
    fio_job "$JOBS/verify-seq-1m.fio" /tmp/verify-dev-1m.fio \
      "filename=$DEV" "offset=$((fs_end + half))" "size=$half" &&
    run_fio verify-device-1m /tmp/verify-dev-1m.fio
}

fio_fsync() {
  mkdir -p "$MNT/$TREE/fio" || return 1
  fio_job "$JOBS/flush-fsync-4k.fio" /tmp/fsync.fio \
    "filename=$MNT/$TREE/fio/fsync.dat" "size=4M" "runtime=${PFLEX_FSYNC_SECONDS:-10}" &&
    run_fio fsync /tmp/fsync.fio
}

block_stats() {
  # /sys/block/nbd0/stat: reads, merged, sectors, ms, writes, merged, sectors, ms, in flight,
  # io ms, queue ms, discards, merged, sectors, ms, flushes, flush ms.
  awk '{
    printf "reads=%d read_kib=%d avg_read_kib=%.1f writes=%d write_kib=%d avg_write_kib=%.1f ",
      $1, $3 / 2, ($1 ? $3 / 2 / $1 : 0), $5, $7 / 2, ($5 ? $7 / 2 / $5 : 0)
    printf "discards=%d discard_kib=%d flushes=%d\n", $12, $14 / 2, $16 }' /sys/block/nbd0/stat
}

unmount_and_check() {
  umount "$MNT" && /usr/sbin/e2fsck -f -n "$DEV"
}

disconnect() {
  info block_stats "$(block_stats)"
  /usr/sbin/nbd-client -d "$DEV" || return 1
  tries=0
  while [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || return 1
    sleep 0.1
  done
}

# cleanup: leaves the device disconnected after a failed step so the server sees a clean close.
cleanup() {
  umount "$MNT" 2>/dev/null
  /usr/sbin/nbd-client -d "$DEV" >/dev/null 2>&1
}

run() {
  step nbd-connect connect || return 1
  if [ "$MKFS" = 1 ]; then
    step mkfs make_fs || return 1
  fi
  step mount mount_fs || return 1
  if [ -n "$CHECK_TREE" ]; then
    step "check-$CHECK_TREE" read_back "$CHECK_TREE" || return 1
  fi
  step write-tree write_tree || return 1
  step read-back read_back "$TREE" || return 1
  step fio-file-verify fio_file_verify || return 1
  step fio-device-verify fio_device_verify || return 1
  step fio-fsync fio_fsync || return 1
  step umount-fsck unmount_and_check || return 1
  step nbd-disconnect disconnect || return 1
}

if run; then
  exit 0
fi
cleanup
exit 1

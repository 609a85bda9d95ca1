#!/bin/sh
# Guest test: every block-device fio job of fio-jobs/blockdev (4 KiB random read and write at QD1
# and QD32, 1 MiB sequential, 70/30 mix) through the kernel NBD client, each for
# PFLEX_FIO_SECONDS (default 10) on the region of the device past the ext4 file system an earlier
# test made (or the whole device when there is none), so the file system survives. Under TCG the
# numbers measure the emulated guest's CPU more than the server: they show function, not speed.
# The functions below run through step(), which shellcheck cannot follow.
# shellcheck disable=SC2317
# shellcheck source=../lib.sh
. /usr/share/pflex/lib.sh

SERVER=${PFLEX_SERVER:-10.0.2.2}
PORT=${PFLEX_PORT:-10809}
EXPORT=${PFLEX_EXPORT:-vol1}
BLOCK=${PFLEX_BLOCK:-4096}
CONNS=${PFLEX_CONNS:-1}
SECONDS_EACH=${PFLEX_FIO_SECONDS:-10}
DEV=/dev/nbd0
JOBS=/usr/share/pflex/fio-jobs

connect() {
  /usr/sbin/nbd-client "$SERVER" "$PORT" "$DEV" -N "$EXPORT" -b "$BLOCK" -C "$CONNS" || return 1
  tries=0
  while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || return 1
    sleep 0.1
  done
}

region_start() {
  /usr/sbin/dumpe2fs -h "$DEV" 2>/dev/null | awk -F: '
    /^Block count/ { count = $2 + 0 } /^Block size/ { size = $2 + 0 }
    END { if (count && size) print count * size; else print 0 }'
}

bench_all() {
  start=$(region_start)
  device_bytes=$(($(cat /sys/block/nbd0/size) * 512))
  info bench_region "offset=$start size=$((device_bytes - start)) seconds_each=$SECONDS_EACH"
  for job in randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 \
    seqwrite-1m-qd8 seqread-1m-qd8 randrw-70-30-4k-qd16; do
    fio_job "$JOBS/$job.fio" "/tmp/$job.fio" "filename=$DEV" "offset=$start" \
      "size=$((device_bytes - start))" "runtime=$SECONDS_EACH" "ramp_time=1" &&
      run_fio "$job" "/tmp/$job.fio" || return 1
  done
}

disconnect() {
  /usr/sbin/nbd-client -d "$DEV"
}

step nbd-connect connect || exit 1
step bench bench_all
status=$?
step nbd-disconnect disconnect || status=1
exit $status

# Helpers for the guest test scripts (busybox sh, sourced): markers on the console, timing, and
# fio job files retargeted at a device, a region or a file.

# uptime_seconds: seconds since boot with two decimals (busybox date has no sub-second clock).
uptime_seconds() {
  read -r up _ </proc/uptime
  echo "$up"
}

# step NAME COMMAND...: runs COMMAND and prints "PFLEX-STEP NAME OK|FAIL (seconds)".
step() {
  step_name=$1
  shift
  step_start=$(uptime_seconds)
  echo "PFLEX-STEP-BEGIN $step_name"
  if "$@"; then
    step_result=OK
  else
    step_result=FAIL
  fi
  step_secs=$(awk -v a="$step_start" -v b="$(uptime_seconds)" 'BEGIN { printf "%.2f", b - a }')
  echo "PFLEX-STEP $step_name $step_result (${step_secs}s)"
  [ "$step_result" = OK ]
}

# info KEY VALUE...: a fact for the host's report.
info() {
  key=$1
  shift
  echo "PFLEX-INFO $key $*"
}

# fio_job SRC DEST KEY=VALUE...: copies job file SRC to DEST with each KEY set to VALUE: an
# existing "KEY=" line is replaced wherever it is, a missing key is added to [global].
fio_job() {
  src=$1
  dest=$2
  shift 2
  cp "$src" "$dest"
  for setting in "$@"; do
    key=${setting%%=*}
    if grep -q "^$key=" "$dest"; then
      sed -i "s|^$key=.*|$setting|" "$dest"
    else
      sed -i "/^\[global\]/a $setting" "$dest"
    fi
  done
}

# run_fio NAME JOBFILE: runs fio on a prepared job file; prints its report and one
# "PFLEX-FIO NAME ..." summary line per job (read/write IOPS and bandwidth, from the terse output).
run_fio() {
  fio_name=$1
  fio_file=$2
  fio_out=/tmp/fio-$fio_name.out
  echo "--- fio $fio_name: $(grep -v '^#' "$fio_file" | grep -v '^$' | tr '\n' ' ')"
  /usr/bin/fio --output-format=normal,terse --terse-version=3 "$fio_file" >"$fio_out" 2>&1
  fio_rc=$?
  grep -v '^3;' "$fio_out"
  # terse v3: 3;version;jobname;groupid;error;read_kb;read_bw;read_iops;read_runtime;...
  # the write block starts at field 47 (write_kb;write_bw;write_iops).
  grep '^3;' "$fio_out" | awk -F';' -v n="$fio_name" '{
    printf "PFLEX-FIO %s job=%s error=%s read_iops=%s read_kib_s=%s write_iops=%s write_kib_s=%s\n",
      n, $3, $5, $8, $7, $49, $48 }'
  return $fio_rc
}

#!/usr/bin/env bash
# Prints the accelerator the test guests should use: "kvm" when a probe guest really boots and
# runs its smoke test under KVM within a short time, "tcg" otherwise. /dev/kvm existing is not
# enough: on some hosts (nested virtualisation) KVM only runs specially built guest kernels and
# Debian's kernel hangs in its decompressor, so this is detected by trying, never configured.
#
# Usage: vm-images/detect-accel.sh [PROBE_LOG]    (PFLEX_VM_ACCEL=kvm|tcg skips the probe)
set -euo pipefail

LOG_PREFIX=detect-accel
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

if [ -n "${PFLEX_VM_ACCEL:-}" ] && [ "$PFLEX_VM_ACCEL" != auto ]; then
  echo "$PFLEX_VM_ACCEL"
  exit 0
fi
probe_log=${1:-$BUILD_DIR/kvm-probe.log}
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  log "no usable /dev/kvm: tcg"
  echo tcg
  exit 0
fi
started=$(date +%s)
"$VM_IMAGES_DIR/boot-guest.sh" --accel kvm --test smoke --timeout "${PFLEX_KVM_PROBE_SECS:-15}" \
  --log "$probe_log" >/dev/null 2>&1 || true
if grep -aq 'PFLEX-TEST smoke PASS' "$probe_log"; then
  log "a guest booted under KVM in $(($(date +%s) - started)) s: kvm"
  echo kvm
else
  log "the KVM probe guest did not finish its smoke test in time (see $probe_log): tcg"
  echo tcg
fi

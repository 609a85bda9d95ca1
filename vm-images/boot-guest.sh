#!/usr/bin/env bash
# Boots the test guest built by build-guest.sh in QEMU with user-mode networking (the guest is
# 10.0.2.15; the host's 127.0.0.1 is 10.0.2.2 from inside) and runs one guest test.
#
# Usage: vm-images/boot-guest.sh [options] [-- extra QEMU arguments]
#   --test NAME       guest test to run: nbd-ext4, bench, smoke, or shell (interactive; default)
#   --set KEY=VALUE   setting for the test, passed as pflex.KEY=VALUE on the kernel command line
#                     (repeatable): server, port, export, block, conns, mkfs, tree, check_tree, ...
#   --log FILE        write the serial console to FILE instead of this terminal
#   --accel MODE      kvm, tcg, or auto (default): KVM when a probe guest really boots under it
#   --timeout SECS    stop the guest after SECS seconds (exit status 124)
#   --memory MIB      guest memory (default 1024)   --cpus N   guest CPUs (default 2)
#   --initrd FILE     boot this initramfs instead of the built one (for example the built one
#                     with an extra archive appended, which the kernel unpacks over it)
#
# The QEMU process replaces this script (exec), so its PID is the PID this script was started
# with; the guest powers itself off when its test ends.
set -euo pipefail

LOG_PREFIX=boot-guest
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

test_name=shell
settings=()
log_file=
accel=${PFLEX_VM_ACCEL:-auto}
timeout_secs=
memory=1024
cpus=2
extra_qemu=()
initrd_override=
while (($#)); do
  case $1 in
    --test) test_name=$2 && shift 2 ;;
    --set) settings+=("$2") && shift 2 ;;
    --log) log_file=$2 && shift 2 ;;
    --accel) accel=$2 && shift 2 ;;
    --timeout) timeout_secs=$2 && shift 2 ;;
    --memory) memory=$2 && shift 2 ;;
    --cpus) cpus=$2 && shift 2 ;;
    --initrd) initrd_override=$2 && shift 2 ;;
    --)
      shift
      extra_qemu=("$@")
      break
      ;;
    -h | --help)
      sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

kernel=$BUILD_DIR/vmlinuz
initramfs=$BUILD_DIR/initramfs.img
if [ ! -s "$kernel" ] || [ ! -s "$initramfs" ]; then
  die "no guest built yet: run vm-images/build-guest.sh"
fi
[ -z "$initrd_override" ] || initramfs=$initrd_override
have qemu-system-x86_64 || die "qemu-system-x86_64 is missing (vm-images/run-tests.sh installs it)"

if [ "$accel" = auto ]; then
  accel=$("$VM_IMAGES_DIR/detect-accel.sh")
fi
# shellcheck disable=SC2054 # commas inside one QEMU argument
case $accel in
  kvm) accel_args=(-accel kvm -cpu max) ;;
  tcg) accel_args=(-accel tcg,thread=multi -cpu max) ;;
  *) die "unknown accelerator: $accel (kvm, tcg or auto)" ;;
esac

cmdline="console=ttyS0 loglevel=4 panic=-1 pflex.test=$test_name"
for setting in "${settings[@]}"; do
  [[ $setting == *=* ]] || die "--set wants KEY=VALUE, not $setting"
  cmdline+=" pflex.$setting"
done

if [ -n "$log_file" ]; then
  mkdir -p "$(dirname "$log_file")"
  : >"$log_file"
  serial=(-serial "file:$log_file")
else
  serial=(-serial mon:stdio)
fi

# shellcheck disable=SC2054 # commas inside QEMU arguments
qemu=(
  qemu-system-x86_64 -name "pflex-$test_name" -nodefaults -no-reboot
  "${accel_args[@]}" -smp "$cpus" -m "$memory"
  -display none "${serial[@]}"
  -kernel "$kernel" -initrd "$initramfs" -append "$cmdline"
  -netdev user,id=net0 -device virtio-net-pci,netdev=net0
  "${extra_qemu[@]}"
)
if [ -n "$timeout_secs" ]; then
  exec timeout --kill-after=5 "$timeout_secs" "${qemu[@]}"
fi
exec "${qemu[@]}"

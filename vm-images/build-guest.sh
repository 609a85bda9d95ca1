#!/usr/bin/env bash
# Builds the test guest: a Debian kernel and an initramfs holding busybox, nbd-client, e2fsprogs,
# fio, their shared libraries, the nbd/ext4/virtio-net modules, the fio job files and the guest
# test scripts, with an init that runs the test named on the kernel command line and powers off.
#
# Usage: vm-images/build-guest.sh [--extra-bin PATH]... [--if-needed]
#   --extra-bin PATH  also put this host binary (and its shared libraries) into /usr/local/bin
#                     of the guest; repeatable (or PFLEX_GUEST_EXTRA_BINS="PATH PATH")
#   --if-needed       do nothing when build/vmlinuz and build/initramfs.img are newer than
#                     every input (scripts, guest files, fio jobs, extra binaries)
#
# Outputs: vm-images/build/vmlinuz, vm-images/build/initramfs.img, vm-images/build/guest.info.
# Downloads (Debian packages only, via apt-get download) are cached in vm-images/.cache/debs.
set -euo pipefail

LOG_PREFIX=build-guest
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=guest.conf
source "$VM_IMAGES_DIR/guest.conf"

if_needed=false
while (($#)); do
  case $1 in
    --extra-bin)
      [ $# -ge 2 ] || die "--extra-bin needs a path"
      GUEST_EXTRA_BINS+=("$2")
      shift 2
      ;;
    --if-needed)
      if_needed=true
      shift
      ;;
    -h | --help)
      sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

KERNEL_OUT=$BUILD_DIR/vmlinuz
INITRAMFS_OUT=$BUILD_DIR/initramfs.img

# The build inputs whose change makes the guest stale.
build_inputs() {
  printf '%s\n' "$VM_IMAGES_DIR/build-guest.sh" "$VM_IMAGES_DIR/lib.sh" "$VM_IMAGES_DIR/guest.conf"
  find "$VM_IMAGES_DIR/guest" "$REPO_DIR/fio-jobs/blockdev" -type f
  local extra
  for extra in "${GUEST_EXTRA_BINS[@]}"; do printf '%s\n' "$extra"; done
}

GUEST_INFO=$BUILD_DIR/guest.info
if $if_needed && [ -s "$KERNEL_OUT" ] && [ -s "$INITRAMFS_OUT" ] && [ -s "$GUEST_INFO" ]; then
  stale=false
  # A different set of extra binaries than the last build also makes it stale.
  [ "$(sed -n 's/^extra_bins //p' "$GUEST_INFO")" = "${GUEST_EXTRA_BINS[*]}" ] || stale=true
  $stale || while IFS= read -r input; do
    if [ "$input" -nt "$INITRAMFS_OUT" ]; then
      stale=true
      break
    fi
  done < <(build_inputs)
  if ! $stale; then
    log "guest is up to date ($INITRAMFS_OUT)"
    exit 0
  fi
fi

have apt-get || die "apt-get is needed (a Debian host)"
for tool in dpkg-deb readelf objcopy cpio ldconfig; do
  have "$tool" || die "$tool is missing (run-tests.sh installs it)"
done

started=$(date +%s)
DEB_DIR=$CACHE_DIR/debs
mkdir -p "$DEB_DIR" "$BUILD_DIR"

# --- 1. Which packages: the kernel, the programs' packages, and their library closure. --------
package_list=$CACHE_DIR/packages.resolved
resolve_packages() {
  apt_ready
  local kernel=${PFLEX_GUEST_KERNEL_PACKAGE:-}
  if [ -z "$kernel" ]; then
    kernel=$(apt-cache depends "$GUEST_KERNEL_META" 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1)
    [ -n "$kernel" ] || die "cannot tell which kernel $GUEST_KERNEL_META depends on"
  fi
  printf '%s\n' "$kernel"
  local wanted
  wanted=$(
    printf '%s\n' "${GUEST_PACKAGES[@]}"
    # Shared libraries come from the lib* (and zlib1g) packages of the Depends closure; the rest
    # (debconf, perl, python...) is not needed to run the programs.
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "${GUEST_PACKAGES[@]}" 2>/dev/null |
      grep -E '^(lib[a-z0-9.+-]+|zlib1g)$' || true
  )
  # Only real packages can be downloaded: virtual names have no Filename.
  # shellcheck disable=SC2086 # one package name a word
  apt-cache show --no-all-versions $wanted 2>/dev/null |
    awk '/^Package:/ { name = $2 } /^Filename:/ { print name }' | sort -u
}

deb_of() { compgen -G "$DEB_DIR/${1}_*.deb" | head -n 1; }

# The resolved list is reused (no network needed) until the guest's definition changes.
if [ -s "$package_list" ] && [ -z "${PFLEX_GUEST_REFRESH:-}" ] &&
  [ "$package_list" -nt "$VM_IMAGES_DIR/guest.conf" ] &&
  [ "$package_list" -nt "$VM_IMAGES_DIR/build-guest.sh" ]; then
  log "using the package list in $package_list (PFLEX_GUEST_REFRESH=1 resolves it again)"
else
  resolve_packages >"$package_list.tmp"
  mv "$package_list.tmp" "$package_list"
fi
mapfile -t packages <"$package_list"
missing=()
for pkg in "${packages[@]}"; do
  [ -n "$(deb_of "$pkg")" ] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt_ready
  log "downloading ${#missing[@]} Debian packages into $DEB_DIR"
  (cd "$DEB_DIR" && apt-get download -qq -o APT::Sandbox::User=root "${missing[@]}" >&2)
fi
kernel_package=$(head -n 1 "$package_list")
kernel_version=${kernel_package#linux-image-}

# --- 2. Unpack every package into a staging root (kept while the package list is the same). ---
STAGE=$BUILD_DIR/stage
stage_stamp=$STAGE/.packages
if ! cmp -s "$package_list" "$stage_stamp" 2>/dev/null; then
  log "unpacking ${#packages[@]} packages into $STAGE"
  rm -rf "$STAGE"
  mkdir -p "$STAGE"
  for pkg in "${packages[@]}"; do
    dpkg-deb -x "$(deb_of "$pkg")" "$STAGE"
  done
  cp "$package_list" "$stage_stamp"
fi

# --- 3. Assemble the initramfs tree. -----------------------------------------------------------
ROOT=$BUILD_DIR/initramfs-root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc/pflex,proc,sys,dev,run,tmp,mnt,root}
# A merged-/usr layout: paths from packages (/sbin/mke2fs) and loaders (/lib64/...) both work.
for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$ROOT/$dir"; done

# canonical PATH: the /usr path of a package path (/sbin/x -> /usr/sbin/x).
canonical() {
  case $1 in
    /bin/* | /sbin/* | /lib/* | /lib64/*) printf '/usr%s\n' "$1" ;;
    *) printf '%s\n' "$1" ;;
  esac
}

# install_file SRC DEST: copies SRC (following symlinks) to DEST inside the guest root.
install_file() {
  local dest
  dest=$ROOT$(canonical "$2")
  mkdir -p "$(dirname "$dest")"
  cp -L "$1" "$dest"
}

elf_files=()
for program in "${GUEST_PROGRAMS[@]}"; do
  # Packages differ on /sbin versus /usr/sbin; the guest has both (merged /usr).
  src=
  for candidate in "$program" "/usr$program" "${program#/usr}"; do
    if [ -e "$STAGE$candidate" ]; then
      src=$STAGE$candidate
      break
    fi
  done
  [ -n "$src" ] || die "$program is in none of the packages"
  install_file "$src" "$program"
  elf_files+=("$src")
done
for extra in "${GUEST_EXTRA_BINS[@]}"; do
  [ -x "$extra" ] || die "extra binary $extra is not an executable file"
  install_file "$extra" "/usr/local/bin/$(basename "$extra")"
  # Debug info only makes the initramfs bigger (release builds here keep it for profiling).
  objcopy --strip-debug "$ROOT/usr/local/bin/$(basename "$extra")"
  elf_files+=("$extra")
done

library_closure "$STAGE" / "${elf_files[@]}" >"$BUILD_DIR/libraries.list"
library_count=0
while read -r lib_root lib_path; do
  install_file "$lib_root$lib_path" "$lib_path"
  library_count=$((library_count + 1))
done <"$BUILD_DIR/libraries.list"

# busybox applets as symlinks, except where a real program of that name is installed.
busybox=$ROOT/usr/bin/busybox
applet_count=0
while IFS= read -r applet; do
  target=$ROOT$(canonical "/$applet")
  name=$(basename "$applet")
  if [ -e "$target" ] || [ -e "$ROOT/usr/bin/$name" ] || [ -e "$ROOT/usr/sbin/$name" ]; then
    continue
  fi
  mkdir -p "$(dirname "$target")"
  ln -s /usr/bin/busybox "$target"
  applet_count=$((applet_count + 1))
done < <("$busybox" --list-full)
ln -sf mke2fs "$ROOT/usr/sbin/mkfs.ext4"
ln -sf e2fsck "$ROOT/usr/sbin/fsck.ext4"

# Kernel modules: the wanted ones and their dependencies, in load order.
MODULE_SRC=$STAGE/lib/modules/$kernel_version
[ -d "$MODULE_SRC" ] || die "no modules for $kernel_version in $kernel_package"
declare -A module_file=()
while IFS= read -r ko; do
  name=$(basename "$ko")
  name=${name%%.ko*}
  module_file[${name//-/_}]=$ko
done < <(find "$MODULE_SRC/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')

declare -A module_state=()
module_order=()
# add_module NAME: appends NAME after its dependencies (depth first, each once).
add_module() {
  local name=${1//-/_} dep ko
  [ -n "${module_state[$name]:-}" ] && return 0
  ko=${module_file[$name]:-}
  [ -n "$ko" ] || die "kernel module $name is not in $kernel_package"
  module_state[$name]=visiting
  local plain=$ko
  case $ko in
    *.xz)
      plain=$BUILD_DIR/modules-tmp/$name.ko
      mkdir -p "$(dirname "$plain")"
      xz -dc "$ko" >"$plain"
      ;;
    *.zst)
      plain=$BUILD_DIR/modules-tmp/$name.ko
      mkdir -p "$(dirname "$plain")"
      zstd -qdc "$ko" >"$plain"
      ;;
  esac
  for dep in $(module_depends "$plain"); do
    add_module "$dep"
  done
  mkdir -p "$ROOT/usr/lib/modules/$kernel_version"
  cp "$plain" "$ROOT/usr/lib/modules/$kernel_version/$name.ko"
  module_order+=("$name")
  module_state[$name]="done"
}
for module in "${GUEST_MODULES[@]}"; do add_module "$module"; done
printf '%s\n' "${module_order[@]}" >"$ROOT/etc/pflex/modules.load"
rm -rf "$BUILD_DIR/modules-tmp"

# The init, the guest tests and the block-device fio jobs.
install -m 0755 "$VM_IMAGES_DIR/guest/init" "$ROOT/init"
mkdir -p "$ROOT/usr/share/pflex/tests" "$ROOT/usr/share/pflex/fio-jobs"
install -m 0644 "$VM_IMAGES_DIR/guest/lib.sh" "$ROOT/usr/share/pflex/lib.sh"
install -m 0755 "$VM_IMAGES_DIR"/guest/tests/*.sh "$ROOT/usr/share/pflex/tests/"
install -m 0644 "$REPO_DIR"/fio-jobs/blockdev/*.fio "$ROOT/usr/share/pflex/fio-jobs/"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n10.0.2.2 host\n' >"$ROOT/etc/hosts"
ldconfig -r "$ROOT" 2>/dev/null || log "note: ldconfig -r failed; the loader searches the default directories"

# --- 4. Pack. ----------------------------------------------------------------------------------
if have zstd; then
  compress=(zstd -q -T0 -3 -c)
else
  compress=(gzip -1 -c)
fi
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) |
  "${compress[@]}" >"$INITRAMFS_OUT.tmp"
mv "$INITRAMFS_OUT.tmp" "$INITRAMFS_OUT"
cp "$STAGE/boot/vmlinuz-$kernel_version" "$KERNEL_OUT"
{
  echo "kernel $kernel_package"
  echo "modules ${module_order[*]}"
  echo "programs ${GUEST_PROGRAMS[*]}"
  echo "extra_bins ${GUEST_EXTRA_BINS[*]}"
  echo "libraries $library_count"
  echo "busybox_applets $applet_count"
  echo "initramfs_bytes $(stat -c %s "$INITRAMFS_OUT")"
} >"$GUEST_INFO"
log "built $KERNEL_OUT and $INITRAMFS_OUT ($(($(stat -c %s "$INITRAMFS_OUT") / 1048576)) MiB," \
  "$library_count libraries, modules: ${module_order[*]}) in $(($(date +%s) - started)) s"

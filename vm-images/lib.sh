# shellcheck shell=bash
#
# Helpers shared by the vm-images scripts (sourced, never run): paths, logging, installing host
# packages from Debian's archive, and the ELF/kernel-module dependency walks the guest build needs.

# The paths every script uses (the sourcing scripts read them).
# shellcheck disable=SC2034
VM_IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$VM_IMAGES_DIR/.." && pwd)
CACHE_DIR=${PFLEX_VM_CACHE_DIR:-$VM_IMAGES_DIR/.cache}
BUILD_DIR=${PFLEX_VM_BUILD_DIR:-$VM_IMAGES_DIR/build}
ARTIFACTS_DIR=${PFLEX_VM_ARTIFACTS_DIR:-$VM_IMAGES_DIR/artifacts}

log() { printf '%s: %s\n' "${LOG_PREFIX:-vm-images}" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# apt_ready: makes sure the package lists are there (a fresh machine may have none yet).
apt_ready() {
  if [ -z "${APT_UPDATED:-}" ] && ! apt-cache show --no-all-versions busybox-static >/dev/null 2>&1; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    APT_UPDATED=1
  fi
}

# ensure_backports: adds bookworm-backports as an apt source when missing (QEMU 10 lives there,
# matching the preinstalled qemu-utils; bookworm's own QEMU 7.2 conflicts with it).
ensure_backports() {
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports as an apt source"
    echo 'deb http://deb.debian.org/debian bookworm-backports main' \
      >/etc/apt/sources.list.d/bookworm-backports.list
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  APT_UPDATED=1
}

# install_host_tools: installs every host tool the guest tests use that is missing.
install_host_tools() {
  local need=()
  have cpio || need+=(cpio)
  have curl || need+=(curl ca-certificates)
  have nbdinfo || need+=(libnbd-bin)
  have nbdfuse || need+=(libnbd-bin)
  have nbdkit || need+=(nbdkit)
  have fusermount3 || need+=(fuse3)
  have mkfs.ext4 || need+=(e2fsprogs)
  have losetup || need+=(mount)
  have objcopy || need+=(binutils)
  have readelf || need+=(binutils)
  have ldconfig || need+=(libc-bin)
  if ((${#need[@]})); then
    apt_ready
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if ! have qemu-system-x86_64; then
    ensure_backports
    log "installing qemu-system-x86 from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-x86 >/dev/null
  fi
}

# elf_needed FILE: the DT_NEEDED sonames of an ELF file, one a line.
elf_needed() {
  readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'
}

# elf_runpath FILE: the DT_RUNPATH / DT_RPATH directories of an ELF file, one a line.
elf_runpath() {
  readelf -d "$1" 2>/dev/null | sed -n 's/.*(R\(UN\)\{0,1\}PATH).*\[\(.*\)\]/\2/p' | tr ':' '\n'
}

# elf_interp FILE: the program interpreter (dynamic loader) of an ELF executable, if any.
elf_interp() {
  readelf -l "$1" 2>/dev/null | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p'
}

# is_elf FILE: true for an ELF file.
is_elf() {
  [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]
}

# Library directories searched inside a root, after an object's own RUNPATH.
LIBRARY_DIRS=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib)

# resolve_library ROOT SONAME RUNPATH...: prints the path (relative to ROOT, leading /) of SONAME
# found under ROOT, searching the RUNPATH directories first. Fails when it is not there.
resolve_library() {
  local root=$1 soname=$2
  shift 2
  local dir
  for dir in "$@" "${LIBRARY_DIRS[@]}"; do
    if [ -e "$root$dir/$soname" ]; then
      printf '%s\n' "$dir/$soname"
      return 0
    fi
  done
  return 1
}

# library_closure ROOT FALLBACK_ROOT FILE...: every shared library (and the loader) the ELF files
# need, transitively, as lines "ROOT_USED PATH". Libraries are looked up under ROOT first (the
# unpacked Debian packages), then under FALLBACK_ROOT (the host, for binaries built here).
library_closure() {
  local root=$1 fallback=$2
  shift 2
  local -A seen=()
  local queue=() file interp soname found lib_root
  for file in "$@"; do
    queue+=("$file")
    interp=$(elf_interp "$file")
    if [ -n "$interp" ] && [ -z "${seen[$interp]:-}" ]; then
      seen[$interp]=1
      if [ -e "$root$interp" ]; then printf '%s %s\n' "$root" "$interp"; else printf '%s %s\n' "$fallback" "$interp"; fi
    fi
  done
  while ((${#queue[@]})); do
    file=${queue[0]}
    queue=("${queue[@]:1}")
    local runpath=()
    mapfile -t runpath < <(elf_runpath "$file")
    for soname in $(elf_needed "$file"); do
      [ -n "${seen[$soname]:-}" ] && continue
      seen[$soname]=1
      lib_root=$root
      if ! found=$(resolve_library "$root" "$soname" "${runpath[@]}"); then
        lib_root=$fallback
        found=$(resolve_library "$fallback" "$soname" "${runpath[@]}") ||
          die "shared library $soname (needed by $file) is in no unpacked package nor on the host"
        log "note: $soname taken from the host ($found)"
      fi
      printf '%s %s\n' "$lib_root" "$found"
      queue+=("$lib_root$found")
    done
  done
}

# module_depends KO: the modules a kernel module depends on (from its .modinfo section).
module_depends() {
  objcopy -O binary --only-section=.modinfo "$1" /dev/stdout 2>/dev/null |
    tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d'
}

# module_softdeps_pre KO: the modules a kernel module asks to be loaded before it (softdep pre:).
module_softdeps_pre() {
  objcopy -O binary --only-section=.modinfo "$1" /dev/stdout 2>/dev/null |
    tr '\0' '\n' | sed -n 's/^softdep=pre: *//p' | tr ' ' '\n' | sed '/^$/d'
}

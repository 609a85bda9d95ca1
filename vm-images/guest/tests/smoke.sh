#!/bin/sh
# Guest test: the guest boots, loads its modules and brings up its network (the init's own steps),
# and its programs run. Used to tell whether hardware acceleration really boots a guest.
# The functions below run through step(), which shellcheck cannot follow.
# shellcheck disable=SC2317
# shellcheck source=../lib.sh
. /usr/share/pflex/lib.sh

programs_run() {
  /usr/sbin/nbd-client --help >/dev/null 2>&1
  [ $? -ne 127 ] && /usr/sbin/mke2fs -V >/dev/null 2>&1 && /usr/bin/fio --version
}

# extra_programs_run: every extra binary (build-guest.sh --extra-bin) starts and prints its help.
extra_programs_run() {
  for program in /usr/local/bin/*; do
    [ -x "$program" ] || continue
    "$program" --help >/dev/null || {
      echo "$program --help failed"
      return 1
    }
    info extra_program "$program"
  done
}

step programs programs_run && step extra-programs extra_programs_run

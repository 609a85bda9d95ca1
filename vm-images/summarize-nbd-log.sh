#!/usr/bin/env bash
# Summarizes an nbdkit request log (written by nbdkit --filter=log logfile=FILE): per NBD command
# the number of requests, the connections that carried them, FUA flags, requests not aligned to
# 4 KiB, and a histogram of request sizes. This is how the kernel client's behaviour (request
# sizes with -b 4096, flush and FUA patterns of ext4, spread over -C connections) is observed.
#
# Usage: vm-images/summarize-nbd-log.sh NBDKIT_LOG [FROM_LINE]
#   FROM_LINE  only lines after this line number (to summarize one guest test of a longer log)
set -euo pipefail

log_file=${1:?usage: summarize-nbd-log.sh NBDKIT_LOG [FROM_LINE]}
from_line=${2:-0}

tail -n "+$((from_line + 1))" "$log_file" | awk '
  # hex: a "0x..." number (mawk has no strtonum).
  function hex(text,    i, digit, value) {
    value = 0
    text = tolower(substr(text, 3))
    for (i = 1; i <= length(text); i++) {
      digit = index("0123456789abcdef", substr(text, i, 1)) - 1
      value = value * 16 + digit
    }
    return value
  }
  function human(bytes) {
    if (bytes >= 1048576 && bytes % 1048576 == 0) return (bytes / 1048576) "M"
    if (bytes >= 1024 && bytes % 1024 == 0) return (bytes / 1024) "K"
    return bytes "B"
  }
  # nbdkit log lines: DATE TIME connection=N Command id=K offset=0x.. count=0x.. fua=0|1 ...
  $3 ~ /^connection=/ && $4 ~ /^(Read|Write|Flush|Trim|Zero|Cache|Extents)$/ {
    op = $4
    conn = substr($3, 12)
    requests[op]++
    if (!((op, conn) in seen_conn)) { seen_conn[op, conn] = 1; conns[op] = conns[op] " " conn }
    count = -1; offset = -1
    for (i = 5; i <= NF; i++) {
      if ($i ~ /^count=/) count = hex(substr($i, 7))
      if ($i ~ /^offset=/) offset = hex(substr($i, 8))
      if ($i == "fua=1") fua[op]++
    }
    if (count >= 0) {
      bytes[op] += count
      sizes[op, count]++
      if (!((op, count) in seen_size)) { seen_size[op, count] = 1; size_list[op] = size_list[op] " " count }
      if (offset % 4096 != 0 || count % 4096 != 0) unaligned[op]++
    }
    next
  }
  END {
    n = split("Read Write Flush Trim Zero Cache Extents", order, " ")
    for (k = 1; k <= n; k++) {
      op = order[k]
      if (!(op in requests)) continue
      line = sprintf("%-7s requests=%d", op, requests[op])
      if (op in bytes) line = line sprintf(" bytes=%s avg=%s", human(bytes[op]), human(int(bytes[op] / requests[op])))
      line = line sprintf(" fua=%d unaligned=%d connections=%s", fua[op] + 0, unaligned[op] + 0, substr(conns[op], 2))
      print line
      if (op in size_list) {
        m = split(substr(size_list[op], 2), list, " ")
        # sort sizes ascending (insertion sort: the lists are short)
        for (a = 2; a <= m; a++) { v = list[a] + 0; b = a - 1; while (b >= 1 && list[b] + 0 > v) { list[b + 1] = list[b]; b-- } list[b + 1] = v }
        hist = ""
        for (a = 1; a <= m; a++) {
          if (m > 12 && sizes[op, list[a]] * 100 < requests[op]) { other += sizes[op, list[a]]; continue }
          hist = hist sprintf(" %s:%d", human(list[a]), sizes[op, list[a]])
        }
        if (other) { hist = hist sprintf(" other:%d", other); other = 0 }
        print "        sizes" hist
      }
    }
  }'

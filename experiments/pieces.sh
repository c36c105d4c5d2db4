# `piece NAME LIMIT_S COMMAND...`, shared by gpu_suite.sh and gpu_sharded.sh (they source this file): runs
# COMMAND unless ONLY (comma-separated names) leaves NAME out or DEADLINE (seconds since the script started)
# leaves under a minute; tees its output to $OUT/NAME.txt and how it ended to $OUT/suite.txt.
piece() {  # name limit_s command...: runs unless ONLY leaves it out or the deadline leaves under a minute
  local name=$1 limit=$2
  shift 2
  if [[ -n $ONLY && ",$ONLY," != *",$name,"* ]]; then
    return
  fi
  local left=$((DEADLINE - SECONDS))
  if ((left < 60)); then
    echo "$name: skipped, ${left} s left before the deadline" | tee -a "$OUT/suite.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "\$ $*" | tee "$OUT/$name.txt"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  local how="exit $rc"
  ((rc == 124 || rc == 137)) && how="stopped at its limit"
  echo "$name: $how after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/suite.txt"
}

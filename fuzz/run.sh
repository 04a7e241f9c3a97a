#!/usr/bin/env bash
# Runs fuzz targets one after another (never two at once), each for $SECS seconds
# (default 600), logging to logs/<target>.log. Usage: ./run.sh [target...]
# Stable Rust is enough: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
set -u
cd "$(dirname "$0")"
SECS=${SECS:-600}
TARGETS=${*:-serial_frame modbus_registers json_status profile_loader wire_decode}
mkdir -p logs
for t in $TARGETS; do
    before=$(find "corpus/$t" -type f | wc -l)
    echo "$(date -u +%FT%TZ) $t: start, corpus $before inputs"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"logs/$t.log" 2>&1
    rc=$?
    after=$(find "corpus/$t" -type f | wc -l)
    echo "$(date -u +%FT%TZ) $t: exit $rc, corpus $after inputs; $(grep -E '^#[0-9]+' "logs/$t.log" | tail -1)"
done

#!/usr/bin/env bash
# A nightly buildfuzz run as one shell step, for CI systems without an
# example in docs/ci: it replays the findings of earlier runs, fuzzes, and
# writes JUnit, Markdown and HTML reports.
#
#   docs/ci/nightly.sh
#
# Run it from a clone of buildfuzz as root on Debian 12 or 13 (./dev.sh
# installs what is missing). Keep the results directory and the download
# cache (~/.cache/buildfuzz, or $BUILDFUZZ_CACHE) between runs, and publish
# the report directory. Settings, all optional:
#
#   BUDGET   time to fuzz                      (default 1h)
#   RESULTS  results directory                 (default findings)
#   REPORT   directory the reports go to       (default report)
#
# Exit codes: 0 when buildfuzz found nothing or only findings that earlier
# runs already had, 1 on new findings or changed signatures, and buildfuzz's
# own code (2 usage or environment error, 130 interrupted) when it failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

budget="${BUDGET:-1h}"
results="${RESULTS:-findings}"
report="${REPORT:-report}"

status=0
./dev.sh run --ci --budget "$budget" --results "$results" \
  --junit "$report/junit.xml" --markdown "$report/summary.md" \
  --html "$report/index.html" || status=$?

case "$status" in
  0)
    echo "nightly: no findings"
    ;;
  3)
    echo "nightly: only findings that earlier runs already had; see $report/summary.md"
    status=0
    ;;
  1)
    echo "nightly: new findings or changed signatures; see $report/summary.md" >&2
    ;;
  *)
    echo "nightly: buildfuzz failed with exit code $status" >&2
    ;;
esac
exit "$status"

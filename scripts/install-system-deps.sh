#!/usr/bin/env bash
# System packages the tests and benchmarks use, from Debian's packages: chromium renders the HTML
# report in a real browser (tests/core/test_report_html.py); wrk loads the API (benchmarks/api_bench.py).
# Only attempted as root with apt available; without them the browser test skips with a reason and
# the API benchmark falls back to a Python load generator.
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages: ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "could not install ${missing[*]}; the tests that need them will skip"
fi
exit 0

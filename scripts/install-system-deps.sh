#!/usr/bin/env bash
# System packages the test suite uses: Debian's chromium renders the HTML report in a real browser.
# Only attempted as root with apt available; the browser test skips with a reason otherwise.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the report test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the browser test will be skipped"
fi
exit 0

#!/usr/bin/env bash
# Regenerates the page screenshots in docs/:
# - the status page: status-desktop.png at 1280 px, status-phone.png at 390 px, status-dark.png
#   at 1280 px in the dark colour scheme;
# - the members' usage page: usage-desktop.png, usage-phone.png and usage-dark.png, the same
#   three ways.
#
# They are taken by the browser tests (tests/status_browser.rs, tests/members/page.rs) from the
# real gateway: for the status page three upstreams with long names and endpoints and some failed
# traffic, for the usage page a member with every limit and three weeks of records. Headless
# Chromium is driven over the DevTools protocol (Emulation.setDeviceMetricsOverride for the width,
# Emulation.setEmulatedMedia prefers-color-scheme for the dark one, Page.captureScreenshot of the
# whole page). Needs Debian's chromium (`apt-get install -y --no-install-recommends chromium`).
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_API_ROUTE_TEST_CHROMIUM="${OPENAI_API_ROUTE_TEST_CHROMIUM:-/usr/bin/chromium}" \
OPENAI_API_ROUTE_SCREENSHOTS="$PWD/docs" \
  cargo test --locked --test main -- status_browser members::page --nocapture
ls -l docs/status-*.png docs/usage-*.png

#!/usr/bin/env bash
# Regenerates the status page screenshots in docs/ (status-desktop.png at 1280 px,
# status-phone.png at 390 px, status-dark.png at 1280 px in the dark colour scheme).
#
# They are taken by the browser test (tests/status_browser.rs) from the real gateway with three
# upstreams with long names and endpoints and some failed traffic: headless Chromium driven over
# the DevTools protocol (Emulation.setDeviceMetricsOverride for the width, Emulation.setEmulatedMedia
# prefers-color-scheme for the dark one, Page.captureScreenshot of the whole page).
# Needs Debian's chromium (`apt-get install -y --no-install-recommends chromium`).
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_API_ROUTE_TEST_CHROMIUM="${OPENAI_API_ROUTE_TEST_CHROMIUM:-/usr/bin/chromium}" \
OPENAI_API_ROUTE_SCREENSHOTS="$PWD/docs" \
  cargo test --locked --test main status_browser -- --nocapture
ls -l docs/status-*.png

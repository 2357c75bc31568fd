#!/usr/bin/env bash
# Build the browser assets of the roomcast chat page.
#
# The page itself (src/roomcast/web/index.html, app.js, style.css) needs no build step;
# the only generated file is the Socket.IO client, copied from node_modules into
# src/roomcast/web/vendor/ (gitignored, shipped in the wheel as package data).
# Versions are pinned by package-lock.json; no CDN is used at run time.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

vendor_dir="src/roomcast/web/vendor"
dist_dir="node_modules/socket.io-client/dist"
stamp="node_modules/.package-lock.json"

if ! command -v npm >/dev/null 2>&1; then
    echo "build-web: npm is required (install Node.js >= 18)" >&2
    exit 1
fi

if [[ ! -d node_modules || ! -f "$stamp" || package-lock.json -nt "$stamp" ]]; then
    echo "build-web: installing JavaScript dependencies (npm ci)"
    npm ci --no-audit --no-fund
    touch "$stamp"
fi

if [[ ! -f "$dist_dir/socket.io.min.js" ]]; then
    echo "build-web: $dist_dir/socket.io.min.js not found after npm ci" >&2
    exit 1
fi

mkdir -p "$vendor_dir"
cp "$dist_dir/socket.io.min.js" "$vendor_dir/socket.io.min.js"
if [[ -f "$dist_dir/socket.io.min.js.map" ]]; then
    cp "$dist_dir/socket.io.min.js.map" "$vendor_dir/socket.io.min.js.map"
fi

version="$(node -p 'require("./node_modules/socket.io-client/package.json").version' 2>/dev/null || echo '?')"
echo "build-web: socket.io-client $version -> $vendor_dir/"

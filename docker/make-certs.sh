#!/usr/bin/env bash
# A CA and a certificate for the compose cluster's NATS server (DNS name `nats`), in the
# directory given (default docker/tls): ca.pem, nats.pem, nats.key.
set -euo pipefail
dir=${1:-$(dirname "$0")/tls}
mkdir -p "$dir"
cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 365 -subj /CN=cadre-compose-ca 2>/dev/null
openssl req "${ec[@]}" -keyout nats.key -out nats.csr -subj /CN=nats 2>/dev/null
printf 'subjectAltName=DNS:nats,DNS:localhost,IP:127.0.0.1\n' > san.ext
openssl x509 -req -in nats.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out nats.pem -days 365 -extfile san.ext 2>/dev/null
chmod 644 ca.pem nats.pem nats.key
rm -f nats.csr san.ext ca.srl
echo "certificates in $dir"

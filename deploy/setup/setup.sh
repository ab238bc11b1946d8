#!/bin/sh
# One-shot setup of the compose stack, run before the broker and the database start:
#
#  1. A private certificate authority and server certificates for the broker (names
#     `mosquitto`, `localhost`, 127.0.0.1) and the database (`postgres`, `localhost`), made on
#     the first run and kept in volumes. To renew them, delete the volumes `tls-ca-private`,
#     `tls-ca`, `tls-mosquitto` and `tls-postgres` and run `docker compose up` again (then give
#     devices the new ca.crt).
#  2. The broker's password file, rewritten from the environment at every run: users `ingest`
#     (the daemon), `devices` and `health` (the broker's own healthcheck, a random password
#     kept next to the file). Passwords are stored hashed (mosquitto_passwd).
#
# The CA's private key stays in `tls-ca-private`, mounted into this container only.
# Directories can be moved with the variables below (the unit tests run this script locally).
set -eu
umask 077

CA_PRIVATE=${CA_PRIVATE:-/pki/ca-private}
CA_PUBLIC=${CA_PUBLIC:-/pki/ca}
MOSQUITTO_TLS=${MOSQUITTO_TLS:-/pki/mosquitto}
POSTGRES_TLS=${POSTGRES_TLS:-/pki/postgres}
MOSQUITTO_AUTH=${MOSQUITTO_AUTH:-/mosquitto-auth}
# Owners inside their images: mosquitto runs as uid 1883, PostgreSQL (Debian image) as 999.
MOSQUITTO_UID=${MOSQUITTO_UID:-1883}
POSTGRES_UID=${POSTGRES_UID:-999}
DAYS=${CERT_DAYS:-825}

# Extensions for X509 verification as Python 3.13's strict mode wants it (key identifiers,
# key usage), which the broker, libpq and Grafana all accept as well.
ca_ext() {
    printf '%s\n' \
        '[req]' 'distinguished_name = dn' '[dn]' '[ca]' \
        'basicConstraints = critical, CA:TRUE, pathlen:0' \
        'keyUsage = critical, keyCertSign, cRLSign' \
        'subjectKeyIdentifier = hash'
}

server_ext() {
    printf '%s\n' \
        'basicConstraints = critical, CA:FALSE' \
        'keyUsage = critical, digitalSignature' \
        'extendedKeyUsage = serverAuth' \
        'subjectKeyIdentifier = hash' \
        'authorityKeyIdentifier = keyid, issuer' \
        "subjectAltName = $1"
}

make_ca() {
    [ -s "$CA_PRIVATE/ca.key" ] && [ -s "$CA_PUBLIC/ca.crt" ] && return 0
    echo "setup: creating the certificate authority"
    ca_ext > "$CA_PRIVATE/ca.cnf"
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$CA_PRIVATE/ca.key" -out "$CA_PUBLIC/ca.crt" -days 3650 -sha256 \
        -subj "/CN=iot-ingest compose CA" -config "$CA_PRIVATE/ca.cnf" -extensions ca
    chmod 644 "$CA_PUBLIC/ca.crt"
}

# issue NAME DIR OWNER SUBJECT_ALT_NAMES: a server key and certificate signed by the CA, unless
# DIR already holds a certificate from this CA.
issue() {
    name=$1 dir=$2 owner=$3 san=$4
    if [ -s "$dir/server.crt" ] && openssl verify -CAfile "$CA_PUBLIC/ca.crt" "$dir/server.crt" >/dev/null 2>&1; then
        return 0
    fi
    echo "setup: issuing the certificate of $name ($san)"
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=$name"
    server_ext "$san" > "$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$CA_PUBLIC/ca.crt" -CAkey "$CA_PRIVATE/ca.key" \
        -CAcreateserial -CAserial "$CA_PRIVATE/ca.srl" -days "$DAYS" -sha256 \
        -extfile "$dir/server.ext" -out "$dir/server.crt"
    rm -f "$dir/server.csr" "$dir/server.ext"
    cp "$CA_PUBLIC/ca.crt" "$dir/ca.crt"
    chmod 644 "$dir/server.crt" "$dir/ca.crt"
    chmod 600 "$dir/server.key"
    chown "$owner:$owner" "$dir/server.key" 2>/dev/null || true
}

write_passwords() {
    : "${MQTT_INGEST_PASSWORD:?MQTT_INGEST_PASSWORD must be set}"
    : "${MQTT_DEVICE_PASSWORD:?MQTT_DEVICE_PASSWORD must be set}"
    new="$MOSQUITTO_AUTH/passwd.new"
    health=$(openssl rand -hex 24)
    rm -f "$new"
    touch "$new"
    mosquitto_passwd -b "$new" ingest "$MQTT_INGEST_PASSWORD"
    mosquitto_passwd -b "$new" devices "$MQTT_DEVICE_PASSWORD"
    mosquitto_passwd -b "$new" health "$health"
    printf '%s' "$health" > "$MOSQUITTO_AUTH/health.pw"
    chown "$MOSQUITTO_UID:$MOSQUITTO_UID" "$new" 2>/dev/null || true
    chmod 600 "$new" "$MOSQUITTO_AUTH/health.pw"
    mv "$new" "$MOSQUITTO_AUTH/passwd"
    echo "setup: broker password file written (users ingest, devices, health)"
}

mkdir -p "$CA_PRIVATE" "$CA_PUBLIC" "$MOSQUITTO_TLS" "$POSTGRES_TLS" "$MOSQUITTO_AUTH"
chmod 755 "$CA_PUBLIC" "$MOSQUITTO_TLS" "$POSTGRES_TLS"
make_ca
issue mosquitto "$MOSQUITTO_TLS" "$MOSQUITTO_UID" "DNS:mosquitto, DNS:localhost, IP:127.0.0.1"
issue postgres "$POSTGRES_TLS" "$POSTGRES_UID" "DNS:postgres, DNS:localhost, IP:127.0.0.1"
write_passwords

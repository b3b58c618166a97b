#!/bin/sh
# What `make bench` needs from Debian that pip cannot install: HAProxy (the load balancer
# compared against), Mosquitto and its clients (the broker), iproute2 (ip netns, tc).
# Idempotent: installs only what is missing, and says what it installs. Run as root:
#     sh bench/setup.sh
set -eu

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/setup.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

missing=""
need() {  # need PACKAGE COMMAND: PACKAGE is missing when COMMAND is not found
    if command -v "$2" >/dev/null 2>&1 || [ -x "/usr/sbin/$2" ] || [ -x "/sbin/$2" ]; then
        echo "bench/setup.sh: $1 already installed ($2 found)"
    else
        missing="$missing $1"
    fi
}

need haproxy haproxy
need mosquitto mosquitto
need mosquitto-clients mosquitto_pub
need iproute2 tc

if [ -z "$missing" ]; then
    echo "bench/setup.sh: nothing to install"
    exit 0
fi

echo "bench/setup.sh: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
apt-get install -y -qq --no-install-recommends $missing >/dev/null
# The packaged services are not wanted: benchmarks start their own on free ports.
for service in haproxy mosquitto; do
    case "$missing " in
        *" $service "*)
            if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
                systemctl disable --now "$service" >/dev/null 2>&1 || true
            fi
            ;;
    esac
done
for package in $missing; do
    echo "bench/setup.sh: $package $(dpkg-query -W -f='${Version}' "$package")"
done

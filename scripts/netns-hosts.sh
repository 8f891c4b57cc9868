#!/usr/bin/env bash
# Simulated hosts on network namespaces, for multi-host runs and benchmarks on
# one machine (the shell twin of tests/netns/mod.rs; root or CAP_NET_ADMIN).
#
#   scripts/netns-hosts.sh up NAME N            N hosts host0..host{N-1} on one switch
#   scripts/netns-hosts.sh exec NAME I CMD...   run CMD on host I (its own network and hostname)
#   scripts/netns-hosts.sh addr NAME I          print host I's address
#   scripts/netns-hosts.sh link NAME I down|up  take host I's link down (or back up)
#   scripts/netns-hosts.sh limit NAME I RATE    rate-limit host I's link both ways (tc tbf,
#                                               e.g. 1gbit, 100mbit); RATE=off removes it
#   scripts/netns-hosts.sh down NAME            stop every process on the hosts, remove it all
#   scripts/netns-hosts.sh list                 the nets this script made
#
# Layout of net NAME: the switch is namespace NAME-sw holding bridge br0; host I
# is namespace NAME-hI with interface eth0 (address 198.18.0.<I+1>/15, the
# range set aside for benchmarking, and a default route through it), wired by a
# veth pair to port hI on the bridge. Nothing is attached to this machine's own
# network, so traffic stays between the hosts. Every host resolves every
# host's name (/etc/netns/NAME-hI/hosts, which `ip netns exec` mounts over
# /etc/hosts), and `exec` gives its command the host's name as hostname.
#
# Example, two hosts running one cohort job:
#   scripts/netns-hosts.sh up demo 2
#   scripts/netns-hosts.sh exec demo 0 target/release/cohort launch --nnodes 2 \
#       --coordinator-bind 198.18.0.1:29400 --token t configs/quickstart.toml &
#   scripts/netns-hosts.sh exec demo 1 target/release/cohort launch --nnodes 2 \
#       --coordinator host0:29400 --token t configs/quickstart.toml
#   scripts/netns-hosts.sh down demo
set -euo pipefail

die() { printf 'netns-hosts: error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# The marker file that says a net was made by this script, and how many hosts it has.
state_dir=/run/cohort-netns

addr_of() { local n=$(($1 + 1)); echo "198.18.$((n / 256)).$((n % 256))"; }

check_name() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$ ]] || die "bad net name '$1' (letters, digits, . _ -)"
}

hosts_of() {
    [[ -f "$state_dir/$1" ]] || die "no net named '$1' (see: $0 list)"
    cat "$state_dir/$1"
}

check_host() {
    local n
    n="$(hosts_of "$1")"
    [[ "$2" =~ ^[0-9]+$ ]] && (($2 < n)) || die "net '$1' has hosts 0..$((n - 1)), not '$2'"
}

up() {
    local name=$1 n=$2 i
    check_name "$name"
    [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 1000)) || die "N must be 1..1000, not '$n'"
    [[ -f "$state_dir/$name" ]] && die "net '$name' exists; remove it first: $0 down $name"
    mkdir -p "$state_dir"
    echo "$n" > "$state_dir/$name"
    # Remove the pieces made so far if a step fails.
    trap 'down "$name" >/dev/null 2>&1' ERR
    local sw="$name-sw"
    ip netns add "$sw"
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    local hosts="127.0.0.1 localhost"$'\n'"::1 localhost"$'\n'
    for ((i = 0; i < n; i++)); do hosts+="$(addr_of "$i") host$i"$'\n'; done
    for ((i = 0; i < n; i++)); do
        local ns="$name-h$i"
        ip netns add "$ns"
        mkdir -p "/etc/netns/$ns"
        printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
        ip -n "$sw" link add "h$i" type veth peer name eth0 netns "$ns"
        ip -n "$sw" link set "h$i" master br0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$(addr_of "$i")/15" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add default dev eth0
    done
    trap - ERR
    echo "net $name: $n host(s), host0..host$((n - 1)) at $(addr_of 0)..$(addr_of $((n - 1)))"
}

down() {
    local name=$1 n i ns
    check_name "$name"
    n="$(cat "$state_dir/$name" 2>/dev/null || echo 0)"
    for ((i = 0; i < n; i++)); do
        ns="$name-h$i"
        # Processes keep a namespace alive after its name is gone: stop them first.
        local pids
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip netns delete "$name-sw" 2>/dev/null || true
    rm -f "$state_dir/$name"
    echo "net $name: removed"
}

cmd=${1:-}
case "$cmd" in
    up) (($# == 3)) || usage; up "$2" "$3" ;;
    down) (($# == 2)) || usage; down "$2" ;;
    exec)
        (($# >= 4)) || usage
        check_host "$2" "$3"
        name=$2 i=$3
        shift 3
        # A UTS namespace of its own, so the command sees the host's name.
        exec ip netns exec "$name-h$i" unshare --uts sh -c \
            'echo "$0" > /proc/sys/kernel/hostname && exec "$@"' "host$i" "$@"
        ;;
    addr) (($# == 3)) || usage; check_host "$2" "$3"; addr_of "$3" ;;
    link)
        (($# == 4)) || usage
        check_host "$2" "$3"
        [[ "$4" == up || "$4" == down ]] || die "link takes up or down, not '$4'"
        ip -n "$2-h$3" link set eth0 "$4"
        # Bringing the link back removed the default route with it: restore it.
        if [[ "$4" == up ]]; then ip -n "$2-h$3" route replace default dev eth0; fi
        ;;
    limit)
        (($# == 4)) || usage
        check_host "$2" "$3"
        # tbf shapes what leaves an interface: eth0 is what the host sends,
        # the switch port hI what it receives.
        for where in "-n $2-h$3 dev eth0" "-n $2-sw dev h$3"; do
            read -r _ ns _ dev <<< "$where"
            if [[ "$4" == off ]]; then
                tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
            else
                tc -n "$ns" qdisc replace dev "$dev" root tbf rate "$4" burst 256kb latency 100ms
            fi
        done
        ;;
    list) [[ -d "$state_dir" ]] && for f in "$state_dir"/*; do [[ -f "$f" ]] && echo "$(basename "$f") $(cat "$f") host(s)"; done; true ;;
    *) usage ;;
esac

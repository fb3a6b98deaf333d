#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for tests and the demo: one ceph-mon, one ceph-osd on
# memstore (RAM), no ceph-mgr, no cephx, pool "rbd" of size 1. Everything (conf, mon store, OSD
# data, logs, pid files, admin sockets) lives in DIR; /etc/ceph and /var/lib/ceph are not used.
# Daemons are started by hand as root (no systemd, cephadm, containers or ceph-volume).
#
#   deploy/ceph.sh up DIR [--netns NAME --addr IP]   start (idempotent); last stdout line: DIR/ceph.conf
#   deploy/ceph.sh down DIR                          stop the daemons of DIR (files stay)
#   deploy/ceph.sh status DIR                        exit 0 (and print the conf) if the cluster answers
#
# Clients: rbd -c DIR/ceph.conf create rbd/img --size 64M
# Environment: CEPH_MEMSTORE_BYTES (OSD capacity, default 1 GiB), CEPH_MON_WAIT (60 s),
# CEPH_OSD_WAIT (90 s), CEPH_STOP_WAIT (10 s), CEPH_CLI_TIMEOUT (20 s per ceph/rbd call).
set -euo pipefail

MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-$((1 << 30))}
MON_WAIT=${CEPH_MON_WAIT:-60}
OSD_WAIT=${CEPH_OSD_WAIT:-90}
STOP_WAIT=${CEPH_STOP_WAIT:-10}
CLI_TIMEOUT=${CEPH_CLI_TIMEOUT:-20}
PG_NUM=8

log() { printf 'ceph.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
    sed -n '7,9s/^# *//p' "$0" >&2
    exit 2
}

# Every ceph/rbd call is bounded: without a reachable mon they can wait forever.
ceph_() { timeout -k 5 "$CLI_TIMEOUT" ceph -c "$CONF" "$@"; }
rbd_() { timeout -k 5 "$CLI_TIMEOUT" rbd -c "$CONF" "$@"; }

set_dir() { # DIR [create]
    [[ -n ${1:-} ]] || usage
    [[ -z ${2:-} ]] || mkdir -p "$1"
    DIR=$(cd "$1" && pwd -P) || exit 1
    # The path goes into ceph.conf unquoted: keep it to characters the conf parser takes as is.
    [[ $DIR =~ ^[A-Za-z0-9/._+-]+$ ]] || die "DIR must match [A-Za-z0-9/._+-]+: $DIR"
    CONF=$DIR/ceph.conf
}

# Serialise concurrent up/down/status on one DIR. fd 9 must not reach the daemons (9>&- below),
# or they would hold the lock for as long as they run.
lock_dir() {
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "$DIR is locked by another deploy/ceph.sh"
}

# --- processes -------------------------------------------------------------------------------

# PID is a live (not zombie) ceph-mon/ceph-osd (NAME mon.a, osd.0) started with this DIR's conf.
# We never signal a process that fails this.
is_ours() {
    local pid=$1 name=$2 cmd state
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) && [[ $state != Z ]] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == "ceph-${name%%.*} "*"-c $CONF "* ]]
}

# The PID of daemon NAME of this DIR, from its pid file (written by the daemon), if it runs.
daemon_pid() {
    local pidfile=$DIR/run/$1.pid pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && is_ours "$pid" "$1" || return 1
    echo "$pid"
}

# SIGTERM, then SIGKILL after STOP_WAIT s.
stop_daemon() {
    local name=$1 pid i
    pid=$(daemon_pid "$name") || { rm -f "$DIR/run/$name.pid"; return 0; }
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_WAIT * 10; i++)); do
        is_ours "$pid" "$name" || break
        sleep 0.1
    done
    if is_ours "$pid" "$name"; then
        log "$name did not stop in ${STOP_WAIT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            is_ours "$pid" "$name" || break
            sleep 0.1
        done
    fi
    rm -f "$DIR/run/$name.pid"
}

stop_all() {
    stop_daemon osd.0
    stop_daemon mon.a
}

log_tails() {
    local f
    for f in "$DIR"/log/mon.a.out "$DIR"/log/mon.a.log "$DIR"/log/osd.0.out "$DIR"/log/osd.0.log; do
        [[ -s $f ]] || continue
        printf '==> %s (last 30 lines) <==\n' "$f" >&2
        tail -n 30 "$f" >&2
    done
}

fail() {
    log "error: $*"
    log_tails
    exit 1
}

# An `up` that fails (or is interrupted) stops the daemons it started; their logs stay.
STARTING=""
on_exit() {
    local rc=$?
    if [[ -n $STARTING && $rc != 0 ]]; then
        log "up failed: stopping the daemons of $DIR"
        stop_all
    fi
    return "$rc"
}
trap on_exit EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# --- cluster checks --------------------------------------------------------------------------

# "osd.0 up" in the OSD map (the mon's view). (Output is captured first: `cmd | grep -q` fails
# under pipefail when grep exits before cmd has written everything.)
osd_up() {
    local dump
    dump=$(ceph_ osd dump 2>/dev/null) && grep -q '^osd\.0 up ' <<<"$dump"
}

# Every PG of the rbd pool active+clean. `ceph pg stat`/`pg ls` are served by ceph-mgr, which we
# do not run (they hang), so ask the OSD itself (over the network, like a client would).
pgs_clean() {
    local n
    n=$(ceph_ tell osd.0 dump_pgstate_history 2>/dev/null |
        grep -c '"currently": "Started/Primary/Active/Clean"') || return 1
    [[ $n -ge $PG_NUM ]]
}

# The cluster of DIR answers: both daemons alive, osd.0 up, pool rbd present, its PGs clean.
cluster_ok() {
    local pools
    [[ -f $CONF ]] && daemon_pid mon.a >/dev/null && daemon_pid osd.0 >/dev/null || return 1
    pools=$(ceph_ osd pool ls 2>/dev/null) && grep -qx rbd <<<"$pools" && osd_up && pgs_clean
}

# --- up --------------------------------------------------------------------------------------

# Two free TCP ports on ADDR (inside the namespace when there is one), for msgr v2 and v1.
free_ports() {
    "${NS_EXEC[@]}" python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind((sys.argv[1], 0))
print(*(s.getsockname()[1] for s in socks))' "$ADDR"
}

write_conf() {
    local fsid=$1 mon_addrs=$2
    cat >"$CONF" <<EOF
# Written by deploy/ceph.sh: a single-node test cluster. Do not edit, it is rewritten by "up".
# deploy/ceph.sh: netns=$NETNS addr=$ADDR
[global]
fsid = $fsid
mon host = $mon_addrs
run dir = $DIR/run
crash dir = $DIR/crash
# No cephx: no keyrings to make or hand to clients (QEMU, librbd, the tests).
auth cluster required = none
auth service required = none
auth client required = none
# One OSD: pools of one replica, placed on any OSD (a CRUSH leaf of type 0 = osd, not host).
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
# The PG autoscaler is a ceph-mgr module: off, so that pools keep the pg_num they are given.
osd pool default pg autoscale mode = off
# Let tests remove their pools (ceph osd pool rm NAME NAME --yes-i-really-really-mean-it).
mon allow pool delete = true

[mon]
mon data = $DIR/\$name
log file = $DIR/log/\$name.log
# All cluster-log channels (cluster, audit) into one file here, not /var/log/ceph.
mon cluster log file = $DIR/log/cluster.log
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
# Health warnings that are expected here: size-1 pools, and auth "none" (no cephx, so the
# global_id reclaim warnings do not apply).
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
# No ceph-mgr runs: without this the mon raises MGR_DOWN ("no active mgr", HEALTH_ERR then
# HEALTH_WARN) 2 minutes after it is created.
mon mgr mkfs grace = 31536000
# The mon warns below 30 % free disk and shuts down below 5 %; a test box's disk is often that
# full, and the mon store stays small.
mon data avail warn = 2
mon data avail crit = 1
# The mon batches map changes for 1 s before proposing them; each step of the start-up (OSD
# boot, pool create, rbd pool init) waits for a few such proposals. A single mon can go faster.
paxos propose interval = 0.1
# On a port conflict fail at once (we pick other ports) instead of retrying 3 x 5 s.
ms bind retry count = 1

[osd]
# The object store is in RAM, bounded by memstore device bytes (the OSD's reported capacity;
# writes past ~95 % of it block: the cluster is full). Its contents die with the OSD (a stop
# does not save them: osd fast shutdown skips the store's umount).
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd data = $DIR/\$name
osd journal = $DIR/\$name/journal
public addr = $ADDR
cluster addr = $ADDR
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid

[client]
# A client of a dead or unreachable cluster errs out after 10 s instead of waiting forever.
client mount timeout = 10
rados mon op timeout = 10
EOF
}

# Start ceph-mon; returns 1 if it could not bind its ports (the caller picks others).
start_mon() {
    local ports v2 v1 mon_addrs fsid out
    ports=$(free_ports) || die "cannot pick free ports on $ADDR${NETNS:+ in netns $NETNS}"
    read -r v2 v1 <<<"$ports"
    mon_addrs="[v2:$ADDR:$v2,v1:$ADDR:$v1]"
    fsid=$(</proc/sys/kernel/random/uuid)
    rm -rf "$DIR/mon.a"
    write_conf "$fsid" "$mon_addrs"
    out=$(monmaptool --create --clobber --fsid "$fsid" --addv a "$mon_addrs" "$DIR/monmap" 2>&1) ||
        fail "monmaptool failed: $out"
    ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" >>"$DIR/log/mon.a.out" 2>&1 ||
        fail "ceph-mon --mkfs failed"
    log "starting mon.a on $mon_addrs${NETNS:+ in netns $NETNS}"
    # ceph-mon forks; the parent exits once the child has bound its ports (non-zero if not).
    "${NS_EXEC[@]}" ceph-mon -c "$CONF" -i a </dev/null >>"$DIR/log/mon.a.out" 2>&1 9>&-
}

wait_until() { # DEADLINE(epoch s) WHAT CMD...: run CMD every 0.5 s until it succeeds
    local deadline=$1 what=$2
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what"
        sleep 0.5
    done
}

mon_answers() {
    daemon_pid mon.a >/dev/null || fail "mon.a is not running"
    ceph_ mon stat >/dev/null 2>&1
}

osd_answers() {
    daemon_pid osd.0 >/dev/null || fail "osd.0 is not running"
    "$@"
}

cmd_up() {
    set_dir "${1:-}" create
    shift
    NETNS="" ADDR=127.0.0.1
    while (($#)); do
        case $1 in
        --netns) NETNS=${2:?--netns NAME} && shift 2 ;;
        --addr) ADDR=${2:?--addr IP} && shift 2 ;;
        *) usage ;;
        esac
    done
    NS_EXEC=()
    if [[ -n $NETNS ]]; then
        [[ $ADDR != 127.0.0.1 ]] || die "--netns needs --addr IP (an address in the namespace)"
        NS_EXEC=(ip netns exec "$NETNS")
        "${NS_EXEC[@]}" true || die "no network namespace $NETNS"
    fi
    lock_dir

    if cluster_ok; then
        if grep -qx "# deploy/ceph.sh: netns=$NETNS addr=$ADDR" "$CONF"; then
            log "cluster in $DIR is running"
            echo "$CONF"
            return 0
        fi
        log "cluster in $DIR runs with other --netns/--addr: restarting it"
    elif [[ -e $CONF ]]; then
        log "cluster in $DIR is not answering: starting afresh"
    fi

    # A fresh cluster: memstore has lost the data of a dead OSD anyway.
    stop_all
    rm -rf "$DIR/mon.a" "$DIR/osd.0" "$DIR/run" "$DIR/crash" "$DIR/monmap" "$CONF" "$DIR/log.old"
    # Keep the logs of the previous cluster (one generation) for a post-mortem.
    [[ ! -d $DIR/log ]] || mv "$DIR/log" "$DIR/log.old"
    mkdir -p "$DIR/run" "$DIR/log" "$DIR/crash" "$DIR/osd.0"
    STARTING=1
    local start=$SECONDS attempt
    for attempt in 1 2 3; do
        start_mon && break
        ((attempt < 3)) || fail "ceph-mon did not start"
        log "ceph-mon could not bind (port taken?): trying other ports"
    done
    wait_until $((SECONDS + MON_WAIT)) "the mon to answer (${MON_WAIT}s)" mon_answers

    local osd_deadline=$((SECONDS + OSD_WAIT)) uuid id
    uuid=$(</proc/sys/kernel/random/uuid)
    # Register osd.0 in the OSD map and make its (memstore) data; on boot the OSD puts itself into
    # the CRUSH map under this host (osd crush update on start).
    id=$(ceph_ osd new "$uuid" 2>>"$DIR/log/osd.0.out") || fail "ceph osd new failed"
    [[ $id == 0 ]] || fail "ceph osd new gave id $id, not 0"
    timeout 60 ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$DIR/log/osd.0.out" 2>&1 ||
        fail "ceph-osd --mkfs failed"
    log "starting osd.0 on $ADDR"
    "${NS_EXEC[@]}" ceph-osd -c "$CONF" -i 0 </dev/null >>"$DIR/log/osd.0.out" 2>&1 9>&- ||
        fail "ceph-osd did not start"
    wait_until "$osd_deadline" "osd.0 to be up (${OSD_WAIT}s)" osd_answers osd_up

    ceph_ osd pool create rbd "$PG_NUM" >&2 || fail "ceph osd pool create rbd failed"
    wait_until "$osd_deadline" "the PGs of pool rbd to be active+clean (${OSD_WAIT}s)" \
        osd_answers pgs_clean
    rbd_ pool init rbd >&2 || fail "rbd pool init rbd failed"
    STARTING=""
    log "cluster up in $((SECONDS - start))s; clients: -c $CONF"
    echo "$CONF"
}

cmd_down() {
    [[ -n ${1:-} ]] || usage
    [[ -d $1 ]] || return 0
    set_dir "$1"
    lock_dir
    stop_all
}

cmd_status() {
    [[ -n ${1:-} ]] || usage
    [[ -d $1 ]] || { log "no $1"; return 1; }
    set_dir "$1"
    lock_dir
    if cluster_ok; then
        log "cluster in $DIR answers"
        echo "$CONF"
    else
        log "cluster in $DIR is not running or not answering"
        return 1
    fi
}

case ${1:-} in
up | down | status)
    cmd=$1
    shift
    "cmd_$cmd" "$@"
    ;;
*) usage ;;
esac

#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying a sweep before sending
# it to a real cluster: `scripts/slurm_local.sh start|stop|status`.
#
#   start    installs slurm-wlm, slurmdbd and mariadb-server where they are missing (apt-get,
#            as root), writes the config under $RANDFEAT_SLURM_DIR (default
#            ${TMPDIR:-/tmp}/randfeat-slurm), starts MariaDB, slurmdbd, slurmctld and slurmd
#            against it and waits until the node is idle. Then:
#                export SLURM_CONF=$RANDFEAT_SLURM_DIR/slurm.conf
#                python train.py -m hydra/launcher=slurm hydra.launcher.partition=local ...
#   stop     cancels the cluster's jobs and stops the daemons that `start` started (by their
#            pid files in that folder), nothing else.
#   status   the daemons, the node and the queue.
#
# Accounting is real (slurmdbd on a MariaDB in that folder): submitit follows its jobs with
# `sacct`, which answers only where the cluster keeps accounting. The node is this machine,
# with its own CPU count and memory (`slurmd -C`); the partition is `local`. Logs, state and
# spool stay in the folder; the daemons listen on 127.0.0.1, ports RANDFEAT_SLURM_PORT (6817)
# to +3. Exit status: 0 done, 1 a daemon did not come up (its log is printed), 3 Slurm cannot
# be installed here (the reason is printed).
set -euo pipefail

dir=${RANDFEAT_SLURM_DIR:-${TMPDIR:-/tmp}/randfeat-slurm}
port=${RANDFEAT_SLURM_PORT:-6817}
partition=local
conf=$dir/slurm.conf
export SLURM_CONF=$conf
daemons=(slurmd slurmctld slurmdbd mariadbd)
packages=(slurm-wlm slurmdbd mariadb-server)
commands=(slurmctld slurmd slurmdbd sinfo sbatch sacct sacctmgr mariadbd mariadb-install-db)

say() { echo "slurm_local: $*" >&2; }

running() {  # running NAME: its pid file names a live process of that name (not a reused pid)
    local pid
    pid=$(cat "$dir/$1.pid" 2>/dev/null) && [ -n "$pid" ] \
        && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

install() {
    local missing=()
    for c in "${commands[@]}"; do command -v "$c" >/dev/null || missing+=("$c"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "missing ${missing[*]}: installing ${packages[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        say "cannot install Slurm: not root (as root: apt-get install ${packages[*]})"
        exit 3
    fi
    if ! command -v apt-get >/dev/null; then
        say "cannot install Slurm: no apt-get here (install ${packages[*]} yourself)"
        exit 3
    fi
    local log=${TMPDIR:-/tmp}/randfeat-slurm-apt.log
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${packages[@]}"; } >"$log" 2>&1; then
        say "cannot install Slurm: apt-get failed ($(tail -n 1 "$log"); all of it in $log)"
        exit 3
    fi
    for c in "${commands[@]}"; do
        command -v "$c" >/dev/null || { say "cannot install Slurm: no $c after apt-get"; exit 3; }
    done
}

write_config() {
    local host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...: this machine
    mkdir -p "$dir/state" "$dir/spool" "$dir/db"
    cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on $host, for tests.
ClusterName=randfeat
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# What submitit's sacct polling needs: job accounting in slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((port + 2))
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# Short waits, so that the tests' cancels and time-outs take seconds.
KillWait=5
DefMemPerCPU=1024
MessageTimeout=10
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$partition Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/none
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$((port + 2))
SlurmUser=root
PidFile=$dir/slurmdbd.pid
LogFile=$dir/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((port + 3))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/slurmdbd.conf"  # slurmdbd refuses a config that others can read
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds, else the logs and exit 1
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 5))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "$what did not come up within $seconds s; the logs in $dir:"
    tail -n 15 "$dir"/*.log >&2 || true
    exit 1
}

node_idle() { [ "$(sinfo -h -N -p "$partition" -o %t 2>/dev/null)" = idle ]; }

start_database() {
    local sql=(mariadb --no-defaults --socket="$dir/db.sock" -u root)
    if [ ! -d "$dir/db/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$dir/db" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >"$dir/mariadb-install.log" 2>&1 \
            || { say "mariadb-install-db failed:"; tail -n 15 "$dir/mariadb-install.log" >&2; exit 1; }
    fi
    setsid mariadbd --no-defaults --datadir="$dir/db" --socket="$dir/db.sock" --user=root \
        --bind-address=127.0.0.1 --port=$((port + 3)) --skip-name-resolve \
        --pid-file="$dir/mariadbd.pid" --log-error="$dir/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 MariaDB "${sql[@]}" -e "SELECT 1"
    "${sql[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
    if running slurmctld && running slurmd && node_idle; then
        say "already running"
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    install
    if [ "$(id -u)" -ne 0 ]; then
        say "cannot start Slurm: its daemons run as root here (SlurmUser=root), and this is $(id -un)"
        exit 3
    fi
    end_jobs  # and the daemons that a failed start left
    stop_daemons
    write_config
    start_database
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -Q add cluster randfeat >/dev/null 2>&1 || true  # there already, on a restart
    slurmctld
    wait_for 30 slurmctld scontrol ping
    local left
    left=$(squeue -h -o %A)  # jobs of a session that ended without `stop`: not to be run now
    if [ -n "$left" ]; then
        say "cancelling the jobs left from before: $left"
        # shellcheck disable=SC2086
        scancel $left
    fi
    slurmd -N "$(hostname -s)"
    wait_for 60 "the node (idle in sinfo)" node_idle
    say "up: partition $partition, $(sinfo -h -N -o '%c CPUs, %m MB') on $(hostname -s);" \
        "logs in $dir"
    echo "export SLURM_CONF=$conf"
}

stop_daemons() {  # Slurm's two first, then the accounting (each pair together: seconds each)
    stop_together slurmd slurmctld
    stop_together slurmdbd mariadbd
}

stop_together() {  # stop_together NAME...: SIGTERM to each, SIGKILL to those alive after 30 s
    local name pid pids=() alive=() tries=0
    for name in "$@"; do
        if running "$name"; then
            pids+=("$(cat "$dir/$name.pid")")
            kill "${pids[-1]}"
        fi
        rm -f "$dir/$name.pid"
    done
    while :; do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [ ${#alive[@]} -eq 0 ] && return 0
        [ "$tries" -ge 150 ] && break
        pids=("${alive[@]}")
        tries=$((tries + 1))
        sleep 0.2
    done
    for pid in "${alive[@]}"; do
        say "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) ignored SIGTERM for 30 s: SIGKILL"
        kill -9 "$pid"
    done
}

end_jobs() {  # the jobs' processes outlive slurmd: end the jobs before the daemons
    running slurmctld || return 0
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    [ -n "$jobs" ] || return 0
    # shellcheck disable=SC2086
    scancel $jobs || true
    for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
}

stop() {
    end_jobs
    stop_daemons
    say "stopped (state and logs kept in $dir)"
}

status() {
    local up=0
    for name in "${daemons[@]}"; do
        if running "$name"; then
            echo "$name: running (pid $(cat "$dir/$name.pid"))"
        else
            echo "$name: stopped"
            up=1
        fi
    done
    if [ "$up" -eq 0 ]; then
        sinfo -N -o "%N %P %t %c %m"
        squeue
    fi
    return "$up"
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status (folder: $dir)" >&2
    exit 2
    ;;
esac

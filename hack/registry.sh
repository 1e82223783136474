#!/usr/bin/env bash
# Run a throwaway docker-registry (Debian's distribution 2.8.x) on 127.0.0.1 for
# the e2e tests and benchmarks.
#
# usage: hack/registry.sh start|stop|status [--port N] [--dir DIR] [--htpasswd FILE]
#
#   --port N         listen on 127.0.0.1:N                 (env CRI_PY_REGISTRY_PORT, default 5000)
#   --dir DIR        storage, config, pid and log files    (env CRI_PY_REGISTRY_DIR,
#                                                           default /tmp/cri-py-registry-<port>)
#   --htpasswd FILE  require basic auth, realm cri-py-test (env CRI_PY_REGISTRY_HTPASSWD);
#                    entries must be bcrypt: htpasswd -Bbn user pass >FILE
#
# The registry runs in its own session so it outlives this script; its PID is
# kept in DIR/registry.pid and its output in DIR/registry.log.  start and stop are
# idempotent.  The env vars are deliberately not named REGISTRY_*: docker-registry
# reads those as config overrides, and we clear them before starting it.
set -euo pipefail

usage() { sed -n '5,11s/^# \{0,1\}//p' "$0" >&2; exit 2; }

cmd=""
port="${CRI_PY_REGISTRY_PORT:-5000}"
dir="${CRI_PY_REGISTRY_DIR:-}"
htpasswd="${CRI_PY_REGISTRY_HTPASSWD:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        start|stop|status) cmd="$1" ;;
        --port) port="${2:?--port needs a value}"; shift ;;
        --port=*) port="${1#*=}" ;;
        --dir) dir="${2:?--dir needs a value}"; shift ;;
        --dir=*) dir="${1#*=}" ;;
        --htpasswd) htpasswd="${2:?--htpasswd needs a value}"; shift ;;
        --htpasswd=*) htpasswd="${1#*=}" ;;
        -h|--help) usage ;;
        *) echo "registry.sh: unknown argument: $1" >&2; usage ;;
    esac
    shift
done
[ -n "$cmd" ] || usage
case "$port" in ''|*[!0-9]*) echo "registry.sh: bad port: $port" >&2; exit 2 ;; esac
dir="${dir:-/tmp/cri-py-registry-$port}"

pidfile="$dir/registry.pid"
logfile="$dir/registry.log"
config="$dir/config.yml"
url="http://127.0.0.1:$port/v2/"
start_timeout=15
stop_timeout=10

# True if PID exists and is not a zombie (kill -0 alone succeeds on zombies,
# and a registry we started is our zombie until this script exits).
alive() {
    local pid="$1" state
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ]
}

# PID from the pid file if it is a live docker-registry.  Checking the command
# line guards against a stale pid file whose PID was reused.
running_pid() {
    local pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q docker-registry || return 1
    echo "$pid"
}

# HTTP status of GET /v2/ ("000" if nothing answers).  Never goes through a proxy.
probe() {
    curl --noproxy '*' -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null || true
}

write_config() {
    cat <<EOF
# Written by hack/registry.sh; regenerated on every start.
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    if [ -n "$htpasswd" ]; then
        cat <<EOF
auth:
  htpasswd:
    realm: cri-py-test
    path: $htpasswd
EOF
    fi
}

do_start() {
    local pid new_config code deadline
    if [ -n "$htpasswd" ]; then
        # A missing file would make the registry invent a user with a random password.
        [ -f "$htpasswd" ] || { echo "registry.sh: htpasswd file not found: $htpasswd" >&2; exit 1; }
        htpasswd=$(realpath "$htpasswd")
        if grep -Eqv '^$|^[^:]*:\$2[aby]\$' "$htpasswd"; then
            echo "registry.sh: warning: $htpasswd has non-bcrypt entries; docker-registry ignores them (use htpasswd -B)" >&2
        fi
    fi
    mkdir -p "$dir/data"
    new_config=$(write_config)

    if pid=$(running_pid); then
        if [ "$new_config" != "$(cat "$config" 2>/dev/null)" ]; then
            echo "registry.sh: registry already running (pid $pid) with a different config; stop it first" >&2
            exit 1
        fi
        echo "registry already running (pid $pid) on 127.0.0.1:$port"
        return 0
    fi
    rm -f "$pidfile"
    code=$(probe)
    if [ "$code" != 000 ]; then
        echo "registry.sh: 127.0.0.1:$port is already in use by another process (GET /v2/ -> $code)" >&2
        exit 1
    fi

    printf '%s\n' "$new_config" >"$config"
    # Clear REGISTRY_* so the environment cannot override the config file.
    (
        for var in $(compgen -e | grep '^REGISTRY_' || true); do unset "$var"; done
        exec setsid docker-registry serve "$config" </dev/null >>"$logfile" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$pidfile"

    deadline=$((SECONDS + start_timeout))
    while :; do
        code=$(probe)
        case "$code" in 200|401) break ;; esac
        if ! alive "$pid"; then
            echo "registry.sh: docker-registry exited during startup; last log lines:" >&2
            tail -n 20 "$logfile" >&2
            rm -f "$pidfile"
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "registry.sh: no answer from $url within ${start_timeout}s (last status $code); stopping it" >&2
            tail -n 20 "$logfile" >&2
            do_stop >/dev/null
            exit 1
        fi
        sleep 0.1
    done
    echo "registry started (pid $pid) on 127.0.0.1:$port${htpasswd:+ with basic auth}; dir $dir"
}

do_stop() {
    local pid deadline
    if ! pid=$(running_pid); then
        rm -f "$pidfile"
        echo "registry not running on 127.0.0.1:$port"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + stop_timeout))
    while alive "$pid"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "registry.sh: pid $pid ignored SIGTERM for ${stop_timeout}s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    rm -f "$pidfile"
    echo "registry stopped (pid $pid) on 127.0.0.1:$port"
}

do_status() {
    local pid
    if pid=$(running_pid); then
        echo "registry running (pid $pid) on 127.0.0.1:$port; GET /v2/ -> $(probe); dir $dir"
    else
        echo "registry not running on 127.0.0.1:$port"
        exit 3
    fi
}

"do_$cmd"

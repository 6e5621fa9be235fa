#!/usr/bin/env bash
# A private Docker engine and the sandbox image, without a registry.
#
#   bash sandboxes/docker/setup-engine.sh [start]   install, start dockerd, build the image (idempotent)
#   bash sandboxes/docker/setup-engine.sh stop      remove our containers, stop dockerd, undo its changes
#   bash sandboxes/docker/setup-engine.sh status    is the engine up, is the image there
#   bash sandboxes/docker/setup-engine.sh env       print `export DOCKER_HOST=...` for this engine
#   bash sandboxes/docker/setup-engine.sh image     (re)build the image only (engine must be up)
#
# The engine is private: its own --data-root, --exec-root, --pidfile and unix socket under
# $SPO_DOCKER_HOME (default ~/.cache/spo-agents/docker), so it never touches a system Docker.
# It runs with --iptables=false --bridge=none: sandbox containers use `--network none`, so the
# engine needs no bridge and changes no firewall rule. `stop` still compares iptables with the
# snapshot taken at `start` and restores it if anything changed.
#
# The image `spo-agents-sandbox:latest` is the offline equivalent of ./Dockerfile: Debian
# bookworm (debootstrap from the Debian mirror apt already uses) with python3, numpy and sympy,
# a non-root user `sandbox` (uid 1000), imported with `docker import`. The spo-agents docker
# backend finds this engine by itself (it looks for the socket below when DOCKER_HOST is unset).
set -euo pipefail

HOME_DIR="${SPO_DOCKER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/spo-agents/docker}"
SOCK="$HOME_DIR/docker.sock"
PIDFILE="$HOME_DIR/dockerd.pid"
LOG="$HOME_DIR/dockerd.log"
IMAGE="${SPO_SANDBOX_IMAGE:-spo-agents-sandbox:latest}"
IMAGE_VERSION=1 # bump when the image definition below changes
SUITE="${SPO_DEBIAN_SUITE:-bookworm}"
PACKAGES="python3-minimal,python3-numpy,python3-sympy"
LABEL="spo-agents.sandbox"

say() { echo "[docker-engine] $*"; }
die() { echo "[docker-engine] error: $*" >&2; exit 1; }
dk() { docker -H "unix://$SOCK" "$@"; }

alive() { # a running (not zombie) process
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

engine_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] && echo "$pid"
}

engine_up() { engine_pid >/dev/null && dk version >/dev/null 2>&1; }

debian_mirror() {
  # The mirror apt is configured with (deb822 or one-line sources), so debootstrap uses the
  # same reachable host; SPO_DEBIAN_MIRROR overrides it.
  if [[ -n "${SPO_DEBIAN_MIRROR:-}" ]]; then echo "$SPO_DEBIAN_MIRROR"; return; fi
  local m
  m="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  [[ -z "$m" ]] && m="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
  echo "${m:-http://deb.debian.org/debian}"
}

install_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ "$(id -u)" == 0 ]] || die "need ${missing[*]} and root to install them: run \`sudo apt-get install -y docker.io debootstrap\`, then this script as root"
  say "installing ${missing[*]} with apt-get"
  local i
  for i in 1 2 3 4 5 6 7 8 9 10 11 12; do # another apt may hold the dpkg lock for a while
    if apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then return 0; fi
    apt-get update -q >/dev/null 2>&1 || true
    sleep 5
  done
  die "could not install ${missing[*]} with apt-get (is the Debian mirror reachable?)"
}

start_engine() {
  if engine_up; then say "dockerd already running (pid $(engine_pid)), socket $SOCK"; return 0; fi
  [[ "$(id -u)" == 0 ]] || die "dockerd needs root: run this script as root (or with sudo)"
  mkdir -p "$HOME_DIR/data" "$HOME_DIR/exec"
  if [[ -f "$PIDFILE" ]] && ! engine_pid >/dev/null; then rm -f "$PIDFILE"; fi
  cleanup_leftovers # of an engine that was killed without `stop`
  rm -f "$SOCK"
  if command -v iptables-save >/dev/null; then
    iptables-save >"$HOME_DIR/iptables.before" 2>/dev/null || true
    iptables -S 2>/dev/null | grep -E '^-P ' >"$HOME_DIR/iptables.policies" || true
  fi
  say "starting dockerd (data $HOME_DIR/data, socket $SOCK, log $LOG)"
  # setsid: the engine outlives this script and is not in the caller's process group.
  setsid dockerd \
    --data-root "$HOME_DIR/data" --exec-root "$HOME_DIR/exec" --pidfile "$PIDFILE" \
    --host "unix://$SOCK" --iptables=false --ip-masq=false --ip-forward=false --bridge=none \
    --userland-proxy=false --log-level warn >>"$LOG" 2>&1 </dev/null &
  local i
  for i in $(seq 1 120); do
    if engine_up; then say "dockerd up (pid $(engine_pid))"; return 0; fi
    sleep 0.5
  done
  tail -n 20 "$LOG" >&2 || true
  die "dockerd did not answer on $SOCK within 60 s (log above: $LOG)"
}

image_current() {
  [[ "$(dk image inspect -f '{{ index .Config.Labels "org.spo-agents.image-version" }}' "$IMAGE" 2>/dev/null || true)" == "$IMAGE_VERSION" ]]
}

build_image() {
  local tarball="$HOME_DIR/rootfs-$SUITE-v$IMAGE_VERSION.tar"
  if [[ ! -s "$tarball" ]]; then
    local root="$HOME_DIR/rootfs.tmp" mirror
    mirror="$(debian_mirror)"
    rm -rf "$root"
    say "debootstrap $SUITE from $mirror with $PACKAGES (a few minutes, once)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >"$HOME_DIR/debootstrap.log" 2>&1 \
      || { tail -n 20 "$HOME_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $HOME_DIR/debootstrap.log)"; }
    # The non-root user the sandbox runs as, and a smaller image.
    grep -q '^sandbox:' "$root/etc/passwd" || echo 'sandbox:x:1000:1000:sandbox:/tmp:/usr/sbin/nologin' >>"$root/etc/passwd"
    grep -q '^sandbox:' "$root/etc/group" || echo 'sandbox:x:1000:' >>"$root/etc/group"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
    tar -C "$root" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$root"
  fi
  say "importing $tarball as $IMAGE"
  dk import \
    --change 'USER 1000:1000' --change 'WORKDIR /tmp' \
    --change 'ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin' \
    --change "LABEL org.spo-agents.image-version=$IMAGE_VERSION" \
    --change 'CMD ["python3"]' \
    "$tarball" "$IMAGE" >/dev/null
  dk run --rm --network none --read-only "$IMAGE" python3 -c \
    'import numpy, sympy, os; assert os.getuid() != 0; print("image ok: numpy", numpy.__version__, "sympy", sympy.__version__)'
}

ensure_image() {
  if image_current; then say "image $IMAGE present"; else build_image; fi
}

remove_containers() {
  local ids
  ids="$(dk ps -aq --filter "label=$LABEL" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    say "removing $(echo "$ids" | wc -l) sandbox container(s)"
    # shellcheck disable=SC2086
    dk rm -f $ids >/dev/null 2>&1 || true
  fi
}

cleanup_leftovers() {
  # dockerd's own containerd (and shims) live under our exec-root; nothing may outlive it.
  local cpid
  for f in "$HOME_DIR/exec/containerd/containerd.pid"; do
    if [[ -f "$f" ]] && cpid="$(cat "$f")" && alive "$cpid" && [[ "$(cat "/proc/$cpid/comm" 2>/dev/null)" == containerd ]]; then
      say "stopping leftover containerd (pid $cpid)"; kill -TERM "$cpid" 2>/dev/null || true
      for i in $(seq 1 20); do alive "$cpid" || break; sleep 0.5; done
      alive "$cpid" && kill -KILL "$cpid" 2>/dev/null || true
    fi
  done
  # containerd's sockets and pid file, when no containerd is left to own them.
  if [[ -d "$HOME_DIR/exec/containerd" ]] && ! { [[ -f "$HOME_DIR/exec/containerd/containerd.pid" ]] && alive "$(cat "$HOME_DIR/exec/containerd/containerd.pid")"; }; then
    rm -f "$HOME_DIR"/exec/containerd/*.sock* "$HOME_DIR/exec/containerd/containerd.pid"
  fi
  # Mounts dockerd may have left under its data/exec roots after an unclean stop.
  local m
  for m in $(awk -v h="$HOME_DIR" 'index($2, h) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}

stop_engine() {
  local pid
  if ! pid="$(engine_pid)"; then
    say "dockerd not running"
  else
    remove_containers
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 60); do alive "$pid" || break; sleep 0.5; done
    if alive "$pid"; then say "dockerd ignored SIGTERM for 30 s; sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  cleanup_leftovers
  rm -f "$PIDFILE" "$SOCK"
  restore_iptables
}

restore_iptables() {
  local before="$HOME_DIR/iptables.before" policies="$HOME_DIR/iptables.policies"
  [[ -f "$before" ]] && command -v iptables-save >/dev/null || return 0
  # Built-in chain policies (dockerd with --iptables sets FORWARD to DROP), then the rules.
  if [[ -f "$policies" ]]; then
    local p chain policy
    while read -r p chain policy; do
      if ! iptables -S "$chain" 2>/dev/null | grep -qx -- "-P $chain $policy"; then
        say "restoring iptables policy $chain $policy"; iptables -P "$chain" "$policy" || true
      fi
    done <"$policies"
    rm -f "$policies"
  fi
  if ! diff -q <(grep -vE '^(#|:)' "$before") <(iptables-save 2>/dev/null | grep -vE '^(#|:)') >/dev/null 2>&1 \
    || ! diff -q <(grep -E '^:' "$before" | cut -d' ' -f1,2) <(iptables-save 2>/dev/null | grep -E '^:' | cut -d' ' -f1,2) >/dev/null 2>&1; then
    say "iptables changed since start: restoring the snapshot"
    iptables-restore <"$before"
  else
    say "iptables unchanged"
  fi
  rm -f "$before"
}

status() {
  if engine_up; then say "dockerd up (pid $(engine_pid)), DOCKER_HOST=unix://$SOCK"; else say "dockerd not running"; return 1; fi
  if image_current; then say "image $IMAGE present"; else say "image $IMAGE missing or outdated"; return 1; fi
  say "sandbox containers: $(dk ps -aq --filter "label=$LABEL" | wc -l)"
}

case "${1:-start}" in
  start) install_tools; start_engine; ensure_image; say "ready: export DOCKER_HOST=unix://$SOCK" ;;
  image) engine_up || die "dockerd is not running: run \`$0 start\`"; build_image ;;
  stop) command -v docker >/dev/null || exit 0; stop_engine ;;
  status) status ;;
  env) echo "export DOCKER_HOST=unix://$SOCK" ;;
  *) die "unknown command \`$1\`; expected one of: start, stop, status, env, image" ;;
esac

#!/usr/bin/env bash
# Install (or remove) homeagent-secrets from the checkout this script lives in.
#
#   systemd/install.sh [--prefix DIR] [--user NAME] [--openbao]      system service (as root)
#   systemd/install.sh --remove [--prefix DIR]                        undo it (keeps the secrets)
#   systemd/install.sh --session [--prefix DIR] [--openbao]           desktop: systemctl --user
#   systemd/install.sh --session --remove
#
# Works on Debian/Ubuntu with PEP 668 ("externally managed environment"): the
# code goes into its own venv, never into the system Python. Idempotent: run it
# again to upgrade; a running agent is restarted when its code changed (and
# unlocked again by secretsd-unlock.service when that is enabled).
#
# System install: venv in --prefix (default /opt/homeagent-secrets), secretsd
# and secretsctl linked into /usr/local/bin, units in /etc/systemd/system, the
# user made by systemd-sysusers (/etc/sysusers.d), the socket directory by
# systemd-tmpfiles (/etc/tmpfiles.d), /etc/homeagent/secretsd.toml (kept if
# present) and the README in /usr/local/share/doc/homeagent-secrets. Nothing is
# enabled or started: that is README's next step.
set -euo pipefail
trap 'echo "install.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

src=$(cd "$(dirname "$0")/.." && pwd)
mode=system
prefix=""
user=homeagent
user_given=0
openbao=0
remove=0

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --user) [ $# -ge 2 ] || usage; user=$2; user_given=1; shift 2 ;;
        --user=*) user=${1#*=}; user_given=1; shift ;;
        --openbao) openbao=1; shift ;;
        --remove) remove=1; shift ;;
        --session) mode=session; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage ;;
    esac
done

if [ "$mode" = system ]; then
    [ "$(id -u)" = 0 ] || die "the system install needs root (or use --session for your own user)"
    unitdir=/etc/systemd/system
    # --remove without --prefix/--user: what the installed unit runs from and as.
    if [ "$remove" = 1 ] && [ -f "$unitdir/secretsd.service" ]; then
        [ -n "$prefix" ] || prefix=$(sed -n 's#^ExecStart=\(/.*\)/bin/secretsd .*#\1#p' "$unitdir/secretsd.service")
        [ "$user_given" = 1 ] || user=$(sed -n 's/^User=//p' "$unitdir/secretsd.service")
    fi
    prefix=${prefix:-/opt/homeagent-secrets}
    bindir=/usr/local/bin
    docdir=/usr/local/share/doc/homeagent-secrets
    systemctl=(systemctl)
    manager_runs() { [ -d /run/systemd/system ]; }
else
    [ "$(id -u)" != 0 ] || die "--session installs for a desktop user: run it as that user, not root"
    [ "$user_given" = 0 ] || die "--user names the system service's user; --session installs for you"
    prefix=${prefix:-$HOME/.local/share/homeagent-secrets}
    bindir=$HOME/.local/bin
    unitdir=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    docdir=$HOME/.local/share/doc/homeagent-secrets
    systemctl=(systemctl --user)
    manager_runs() { [ -n "${XDG_RUNTIME_DIR:-}" ] && [ -S "$XDG_RUNTIME_DIR/systemd/private" ]; }
fi
case "$prefix" in
    /*) ;;
    *) die "--prefix must be an absolute path (got $prefix)" ;;
esac
prefix=${prefix%/}
case "$user" in
    ''|*[!a-z0-9_-]*|[0-9-]*) die "--user must be a plain user name (got '$user')" ;;
esac

units=(secretsd.service secretsd.socket)
[ "$mode" = system ] && units+=(secretsd-unlock.service secretsd-credentials.socket)

# A venv this script made: refuse to install into or delete anything else.
is_our_venv() { [ -f "$1/pyvenv.cfg" ] && [ -x "$1/bin/python" ]; }

# --- remove ------------------------------------------------------------------------

if [ "$remove" = 1 ]; then
    if manager_runs; then
        "${systemctl[@]}" disable --now "${units[@]}" >/dev/null 2>&1 || true
    else
        "${systemctl[@]}" disable "${units[@]}" >/dev/null 2>&1 || true
    fi
    for u in "${units[@]}"; do rm -f "$unitdir/$u"; done
    if [ "$mode" = system ]; then
        rm -f "$unitdir/secretsd.service.d/openbao.conf"
        rmdir "$unitdir/secretsd.service.d" 2>/dev/null || true
        rm -f /etc/sysusers.d/homeagent-secrets.conf /etc/tmpfiles.d/homeagent-secrets.conf
        rmdir /run/homeagent 2>/dev/null || true
    fi
    for b in secretsd secretsctl; do
        if [ -L "$bindir/$b" ] && [ "$(readlink "$bindir/$b")" = "$prefix/bin/$b" ]; then
            rm -f "$bindir/$b"
        fi
    done
    if is_our_venv "$prefix"; then
        rm -rf "$prefix"
    elif [ -e "$prefix" ]; then
        say "left $prefix alone: it is not a venv"
    fi
    rm -rf "$docdir"
    if manager_runs; then "${systemctl[@]}" daemon-reload; fi
    if [ "$mode" = system ]; then
        say "removed. Kept: the secrets in /var/lib/homeagent, /etc/homeagent, the sealed passphrase" \
            "in /etc/credstore.encrypted and the user '$user' (delete them by hand if you mean to)."
    else
        say "removed. Kept: your secrets in ~/.homeagent."
    fi
    exit 0
fi

# --- install -------------------------------------------------------------------------

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "needs python3 >= 3.11 (Debian 12 has 3.11)"
python3 -c 'import ensurepip, venv' 2>/dev/null \
    || die "python3 cannot make a venv: apt-get install python3-venv"
[ -f "$src/pyproject.toml" ] || die "$src is not a homeagent-secrets checkout"

if [ -e "$prefix" ] && ! is_our_venv "$prefix"; then
    [ -z "$(ls -A "$prefix")" ] || die "$prefix exists and is not a venv: pick another --prefix"
fi
if ! is_our_venv "$prefix"; then
    say "creating the venv $prefix"
    python3 -m venv "$prefix"
fi

# What is installed now (every file and its hash), to tell an upgrade from a
# re-run; direct_url.json names the temporary build directory, new each time.
installed_record() {
    { cat "$prefix"/lib/python3*/site-packages/homeagent_secrets-*.dist-info/RECORD 2>/dev/null || true; } \
        | sed '/\/direct_url.json,/d' | sha256sum
}
before=$(installed_record)

# pip builds in the source tree (build/, *.egg-info): build a copy instead, so
# a root install leaves no root-owned files in the checkout.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
tar -C "$src" --exclude='./.*' --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=./tests -cf - . | tar -C "$stage" -xf -
target="${stage}[daemon]"
[ "$openbao" = 1 ] && target="${stage}[openbao]"
say "installing $src into $prefix"
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$target"
changed=0
[ "$(installed_record)" = "$before" ] || changed=1

mkdir -p "$bindir"
for b in secretsd secretsctl; do
    ln -sfn "$prefix/bin/$b" "$bindir/$b"
done

# Write $2 from stdin only when it differs (a re-run changes nothing); wrote=1
# when it did.
wrote=0
put() {
    local mode=$1 dest=$2 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$tmp" "$dest"
    rm -f "$tmp"
    wrote=1
}

if [ "$mode" = system ]; then
    # The user, and the dedicated group `homeagent` that owns the socket: with
    # --user NAME an existing user keeps its own primary group (often a shared
    # one like `users`) and only joins this one.
    put 0644 /etc/sysusers.d/homeagent-secrets.conf < <(
        sed "s/^u homeagent /u $user /" "$src/systemd/homeagent-secrets.sysusers"
        if [ "$user" != homeagent ]; then
            printf 'g homeagent -\nm %s homeagent\n' "$user"
        fi)
    systemd-sysusers /etc/sysusers.d/homeagent-secrets.conf
    put 0644 /etc/tmpfiles.d/homeagent-secrets.conf < <(
        sed "s/ homeagent homeagent / $user homeagent /" "$src/systemd/homeagent-secrets.tmpfiles")
    systemd-tmpfiles --create /etc/tmpfiles.d/homeagent-secrets.conf

    # (put reads from a redirection, not a pipe: a pipe would run it in a
    # subshell and lose `wrote`.)
    wrote=0
    for u in "${units[@]}"; do
        put 0644 "$unitdir/$u" < <(
            sed -e "s#/opt/homeagent-secrets#$prefix#g" \
                -e "s/^User=homeagent\$/User=$user/" \
                -e "s/^SocketUser=homeagent\$/SocketUser=$user/" \
                "$src/systemd/$u")
    done
    if [ "$openbao" = 1 ]; then
        put 0644 "$unitdir/secretsd.service.d/openbao.conf" <"$src/systemd/secretsd-openbao.conf"
    fi
    units_changed=$wrote

    # The config is the admin's: written once, never overwritten.
    install -d -m 0750 -o root -g homeagent /etc/homeagent
    if [ ! -e /etc/homeagent/secretsd.toml ]; then
        install -m 0640 -o root -g homeagent "$src/systemd/secretsd.toml" /etc/homeagent/secretsd.toml
    fi
else
    wrote=0
    for u in "${units[@]}"; do
        put 0644 "$unitdir/$u" <"$src/systemd/user/$u"
    done
    units_changed=$wrote
fi
put 0644 "$docdir/README.md" <"$src/README.md"

if manager_runs; then
    "${systemctl[@]}" daemon-reload
    # An upgrade takes effect at once; restarting the socket restarts the
    # agent with it (Requires=), and secretsd-unlock.service follows (PartOf=).
    if [ "$changed" = 1 ] || [ "$units_changed" = 1 ]; then
        if "${systemctl[@]}" is-active --quiet secretsd.socket; then
            say "restarting secretsd.socket (and the agent, if it runs) on the new version"
            "${systemctl[@]}" restart secretsd.socket
        elif "${systemctl[@]}" is-active --quiet secretsd.service; then
            "${systemctl[@]}" restart secretsd.service
        fi
    fi
fi

if [ "$mode" = system ]; then
    say "done. Next: systemctl enable --now secretsd.socket (README, \"Running under systemd\")"
else
    say "done. Next: systemctl --user enable --now secretsd.socket (README, \"Running under systemd\")"
fi

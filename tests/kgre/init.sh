#!/bin/sh
# /init of the TPB kernel GRE peer VM (busybox sh, PID 1).
#
# 1. mounts proc/sys/dev, loads the modules listed in /lib/modules/load.order;
# 2. runs /etc/tpbgre/setup.sh: the per-boot configuration (NIC address and
#    routes, the gre1 tunnel, inner addresses/routes) written by the Python
#    side into a small cpio appended to the initramfs;
# 3. starts the servers (tpb-echod: TCP/UDP echo on 7, sink on 9; iperf3 -s)
#    and the command agent on /dev/ttyS1;
# 4. prints "TPB-KGRE READY" on the console (ttyS0), or "TPB-KGRE FAILED: ..."
#    and powers off.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/log
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1

# busybox sh runs its own applets before searching PATH: these names must
# reach the real iproute2 binaries.  (The agent's scripts start with it too.)
cat > /etc/tpbgre-shrc <<'EOF'
ip() { /usr/sbin/ip "$@"; }
EOF
. /etc/tpbgre-shrc

say() { echo "tpbgre: $*"; }
fail() {
    echo "TPB-KGRE FAILED: $*"
    sleep 1
    poweroff -f
}
# Used by setup.sh: echo the command, run it, stop the boot if it fails.
run() {
    echo "+ $*"
    "$@" || fail "exit $? from: $*"
}

say "booted $(uname -r) in $(cut -d' ' -f1 /proc/uptime)s"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done < /lib/modules/load.order
say "modules loaded: $(tr '\n' ' ' < /lib/modules/load.order)"

ip link set lo up
[ -f /etc/tpbgre/setup.sh ] || fail "no /etc/tpbgre/setup.sh: was the config cpio appended?"
. /etc/tpbgre/setup.sh

# The servers.
if [ "${TPBGRE_SERVERS:-1}" = 1 ]; then
    tpb-echod 7 9 > /var/log/echod.log 2>&1 &
    if command -v iperf3 > /dev/null; then
        iperf3 -s -D --logfile /var/log/iperf3.log || say "iperf3 did not start"
    fi
fi

# The command agent: one request per line on ttyS1, "ID TIMEOUT BASE64(script)";
# the answer is "@@TPB-BEGIN ID", the output in base64 on one line, then
# "@@TPB-END ID RC".
agent() {
    while IFS= read -r line; do
        set -- $line
        [ $# -eq 3 ] || continue
        { cat /etc/tpbgre-shrc; echo "$3" | base64 -d; } > /tmp/agent.sh 2>/dev/null
        timeout "$2" sh /tmp/agent.sh > /tmp/agent.out 2>&1 < /dev/null
        rc=$?
        echo "@@TPB-BEGIN $1"
        base64 -w 0 /tmp/agent.out
        echo
        echo "@@TPB-END $1 $rc"
    done
}
if stty -F /dev/ttyS1 raw -echo 2>/dev/null; then
    agent < /dev/ttyS1 > /dev/ttyS1 2>&1 &
else
    say "no /dev/ttyS1: no command agent"
fi

sleep 0.2
ip -d link show gre1 2>/dev/null
ip addr
ip route
echo "TPB-KGRE READY uptime=$(cut -d' ' -f1 /proc/uptime)"

while :; do
    sleep 3600 &
    wait
done

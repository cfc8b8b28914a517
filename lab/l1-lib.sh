# Shared by the L1 inits (l1-init.sh, l1-bench.sh), which source it as /lab/lib.sh:
# mounts, and the console protocol xtask reads:
#   KVMLAB step NAME BUDGET_S          a step starts; xtask kills the run if it overruns
#   KVMLAB begin KIND TAG ... KVMLAB end KIND TAG   a file, verbatim
#   KVMLAB result pass | KVMLAB result fail WHY    the last line, always
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
# Only emergencies on the console: nothing may interleave with the files we print.
echo 1 > /proc/sys/kernel/printk

say() { echo "KVMLAB $*"; }
step() { say "step $1 $2"; }
up() { cut -d' ' -f1 /proc/uptime; }
# The UART sends at line speed: wait until its transmit count stops moving, or
# power-off cuts the console short.
drain() {
    was=
    now=$(grep '^0:' /proc/tty/driver/serial)
    while [ "$was" != "$now" ]; do
        was=$now
        sleep 0.5
        now=$(grep '^0:' /proc/tty/driver/serial)
    done
}
finish() {
    say "result $*"
    drain
    poweroff -f
}
section() { # KIND TAG FILE
    say "begin $1 $2"
    cat "$3"
    echo
    say "end $1 $2"
}
# Waits until kvmtrace (pid $1, stderr in $2) says it is attached and recording.
attached() {
    n=0
    until grep -q "recording VM exits" "$2"; do
        kill -0 "$1" 2>/dev/null || return 1
        n=$((n + 1))
        [ $n -lt 600 ] || return 1
        sleep 0.2
    done
}

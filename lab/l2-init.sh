#!/bin/busybox sh
# L2 /init of `cargo xtask lab`'s boot workload: the test VM's whole user space.
B=/bin/busybox
$B mount -t proc proc /proc
echo "KVMLAB-L2 end uptime=$($B cut -d' ' -f1 /proc/uptime) cpus=$($B grep -c ^processor /proc/cpuinfo)"
$B poweroff -f

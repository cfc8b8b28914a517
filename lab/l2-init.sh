#!/bin/busybox sh
# L2 /init of `cargo xtask lab`'s boot workload: the test VM's whole user space.
# With kvmtrace in the initrd, the guest reads the patched KVM's exit counters through
# CPUID and prints them as JSON between markers; L1's `kvmtrace record --snapshots`
# sees every one of those reads with the host's own count at that instant.
B=/bin/busybox
$B mount -t proc proc /proc
# `cargo xtask lab --guest-args "..."`: e.g. another patch's leaf numbers.
GUEST_ARGS=$($B cat /etc/guest-args)
if [ -x /bin/kvmtrace ]; then
    echo "KVMLAB-GUEST begin"
    # shellcheck disable=SC2086 # the options are words
    /bin/kvmtrace guest --format json $GUEST_ARGS
    echo "KVMLAB-GUEST end rc=$?"
fi
if $B grep -q kvmlab.sweep /proc/cmdline && [ -x /bin/kvmtrace ]; then
    echo "KVMLAB-SWEEP begin"
    # shellcheck disable=SC2086
    /bin/kvmtrace guest --sweep --format json $GUEST_ARGS
    echo "KVMLAB-SWEEP end rc=$?"
fi
echo "KVMLAB-L2 end uptime=$($B cut -d' ' -f1 /proc/uptime) cpus=$($B grep -c ^processor /proc/cpuinfo)"
$B poweroff -f

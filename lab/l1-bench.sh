#!/bin/busybox sh
# L1 /init of `cargo xtask bench`: runs inside Bochs (guest time follows the instruction
# count, so a run's time repeats). The `micro` VMM runs CPUIDS CPUID exits under each
# configuration, ROUNDS times, configurations interleaved within a round:
#   stock      Debian's kvm modules, nothing tracing
#   kvmtrace-empty  + an empty eBPF program on the raw exit tracepoint (`record
#              --counts-only --empty-program`): the floor any eBPF counter pays
#   kvmtrace-counts  + `kvmtrace record --counts-only` (the count path)
#   kvmtrace-counts-classic  the same on the classic tracepoint
#   kvmtrace   + `kvmtrace record` (system-wide, attached before the VM starts)
#   kvmtrace-classic  the same on the classic tracepoint
#   kvmtrace-per-vcpu, kvmtrace-snapshots, kvmtrace-detail  + record with that flag
#   perf       + `perf kvm stat record -a` (Debian's linux-perf), as users run it
#   perf-big   the same with a ring buffer big enough to lose nothing (-m PERF_PAGES)
#   hist       + the kernel's hist trigger on kvm:kvm_exit
#   bpftrace   + Debian's bpftrace counting kvm:kvm_exit with count()
#   patched    our patched kvm modules, nothing tracing
#   patched-no-cycles  the same series without its cycles (BENCH ONLY variant), the
#              count alone
#   unpatched  the same out-of-tree build without the patch, nothing tracing
#   stock-crowd, kvmtrace-counts-crowd, kvmtrace-crowd  the same CPUID exits spread over
#              CROWD micro VMs at once (each CPUIDS / CROWD), untraced, under
#              --counts-only and under the default record: the first start to the
#              last end
# then once more under kvmtrace (default and --counts-only) with
# kernel.bpf_stats_enabled=1 for the eBPF run time per exit, and `kvmtrace export`
# scraped SCRAPES times with EXPORT_VMS VMs' series in it. PARTS=crowd runs only
# stock, the two records and the crowd in each round (then the bpf-stats and the
# scrape). Lines for xtask:
#   KVMLAB bench CONFIG ROUND run_ns=N cpu_ns=N [tracer_ns=N]   one timed run
#   KVMLAB scrape vms=N series=N bytes=N scrapes=N seconds=S
# besides the protocol of lab/l1-lib.sh.
export PATH=/bin:/usr/bin
. /lab/lib.sh
. /lab/env

load() { # stock | patched | no-cycles | unpatched
    for m in $KVM_DEPS $KVM_VENDOR.ko; do
        args=
        [ "$m" = "$KVM_VENDOR.ko" ] && args="$PAGING=1"
        insmod /lib/modules/$1/$m $args || finish fail "insmod $1/$m"
    done
}
unload() {
    rmmod $KVM_MODULE && rmmod kvm && rmmod irqbypass || finish fail "rmmod"
}
# One timed run of the micro VMM; its own clock covers KVM_RUN to the HLT exit.
measure() { # CONFIG ROUND
    /bin/micro $CPUIDS 0 > /tmp/micro.out 2>&1 || { cat /tmp/micro.out; finish fail "micro under $1"; }
    ns=$(sed -n 's/^micro: run_ns=//p' /tmp/micro.out)
    cpu=$(sed -n 's/^micro: cpu_ns=//p' /tmp/micro.out)
    say "bench $1 $2 run_ns=$ns cpu_ns=$cpu"
}
# The CPU time of process $1's live threads (ns), from the scheduler: 0 without $1.
cpu_of() { # [PID]
    [ -n "$1" ] || { echo 0; return; }
    cat /proc/$1/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }'
}
# The same CPUID exits over CROWD VMs at once: from the first VM's first KVM_RUN to the
# last VM's last HLT exit, on L1's monotonic clock (run_ns); the VMs' vCPU threads' own
# CPU time, all together (cpu_ns); and the CPU time the tracer's user space (pid
# TRACER) took meanwhile (tracer_ns).
measure_crowd() { # CONFIG ROUND [TRACER]
    rm -f /tmp/crowd.*
    tracer0=$(cpu_of $3)
    n=0
    vms=
    while [ $n -lt $CROWD ]; do
        /bin/micro $((CPUIDS / CROWD)) 0 > /tmp/crowd.$n 2>&1 &
        vms="$vms $!"
        n=$((n + 1))
    done
    # The VMs only: a bare `wait` would also wait for the kvmtrace record running
    # in the background, which ends only at its SIGINT.
    wait $vms
    ended=$(grep -l 'KVMLAB-L2 end' /tmp/crowd.* | wc -l)
    [ "$ended" = "$CROWD" ] || { cat /tmp/crowd.0; finish fail "crowd under $1: $ended of $CROWD VMs ended"; }
    from=$(sed -n 's/^micro: run_from_ns=\([0-9]*\) .*/\1/p' /tmp/crowd.* | sort -n | head -n 1)
    to=$(sed -n 's/^micro: run_from_ns=.* run_to_ns=//p' /tmp/crowd.* | sort -n | tail -n 1)
    tracer1=$(cpu_of $3)
    # The sum passes 2^31: printed as a double (exact to 2^53), not with %d.
    cpu=$(cat /tmp/crowd.* | awk -F= '/^micro: cpu_ns=/ { s += $2 } END { printf "%.0f", s }')
    say "bench $1 $2 run_ns=$((to - from)) cpu_ns=$cpu tracer_ns=$((tracer1 - tracer0))"
}
# perf kvm stat record as users run it (-a: every CPU, like kvmtrace; -o in tmpfs),
# with more arguments after the round; perf writes its header at once.
perf_run() { # CONFIG ROUND [PERF ARGS]
    config=$1
    round=$2
    shift 2
    perf kvm stat record -a -o /tmp/perf.data "$@" </dev/null >/tmp/perf.err 2>&1 &
    PERF=$!
    n=0
    until [ -s /tmp/perf.data ]; do
        kill -0 $PERF 2>/dev/null || { cat /tmp/perf.err; finish fail "perf exited"; }
        n=$((n + 1))
        [ $n -lt 600 ] || finish fail "perf did not start"
        sleep 0.1
    done
    sleep 1
    measure $config $round
    kill -INT $PERF
    wait $PERF
    perf kvm -i /tmp/perf.data stat report --event=vmexit > /tmp/perf.txt 2>&1
    section $config-report r$round /tmp/perf.txt
    section $config-stderr r$round /tmp/perf.err
    rm -f /tmp/perf.data /tmp/perf.data.old
}
# kvmtrace record in the background; returns once it is attached.
kvmtrace_start() { # TAG [RECORD ARGS]
    tag=$1
    shift
    kvmtrace record --format json -o /tmp/kt-$tag.json "$@" </dev/null 2>/tmp/kt-$tag.err &
    KT=$!
    attached $KT /tmp/kt-$tag.err || { cat /tmp/kt-$tag.err; finish fail "kvmtrace did not attach"; }
}
kvmtrace_stop() { # TAG
    kill -INT $KT
    wait $KT
    section kvmtrace $1 /tmp/kt-$1.json
}

EXIT=/sys/kernel/tracing/events/kvm/kvm_exit
step l1-modules 120
say "l1 up kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) bpf_jit_enable=$(cat /proc/sys/net/core/bpf_jit_enable) clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
load stock
/bin/micro 1000 0 > /dev/null || finish fail "micro warm-up"
for round in $(seq 1 $ROUNDS); do
    step round$round $ROUND_BUDGET
    measure stock $round

    kvmtrace_start c$round --counts-only
    measure kvmtrace-counts $round
    kvmtrace_stop c$round

    kvmtrace_start r$round
    measure kvmtrace $round
    kvmtrace_stop r$round

    if [ "$PARTS" = all ]; then
        kvmtrace_start e$round --counts-only --empty-program
        measure kvmtrace-empty $round
        kill -INT $KT
        wait $KT

        kvmtrace_start k$round --counts-only --classic-tracepoint
        measure kvmtrace-counts-classic $round
        kvmtrace_stop k$round

        kvmtrace_start t$round --classic-tracepoint
        measure kvmtrace-classic $round
        kvmtrace_stop t$round

        kvmtrace_start v$round --per-vcpu
        measure kvmtrace-per-vcpu $round
        kvmtrace_stop v$round

        kvmtrace_start s$round --snapshots
        measure kvmtrace-snapshots $round
        kvmtrace_stop s$round

        kvmtrace_start d$round --detail
        measure kvmtrace-detail $round
        kvmtrace_stop d$round

        perf_run perf $round
        # Losing nothing takes more than a big buffer: the kernel throttles a sampling
        # event past perf_event_max_sample_rate (and lowers that rate when perf's
        # interrupts take long), which drops samples silently. Lift both for this run.
        rate=$(cat /proc/sys/kernel/perf_event_max_sample_rate)
        pct=$(cat /proc/sys/kernel/perf_cpu_time_max_percent)
        echo 0 > /proc/sys/kernel/perf_cpu_time_max_percent
        echo 10000000 > /proc/sys/kernel/perf_event_max_sample_rate
        perf_run perf-big $round -m $PERF_PAGES
        echo $rate > /proc/sys/kernel/perf_event_max_sample_rate
        echo $pct > /proc/sys/kernel/perf_cpu_time_max_percent

        echo 'hist:keys=exit_reason:vals=hitcount' > $EXIT/trigger || finish fail "hist trigger"
        measure hist $round
        echo '!hist:keys=exit_reason:vals=hitcount' >> $EXIT/trigger

        # bpftrace prints "Attaching 1 probe..." once attached, and the map at SIGINT.
        bpftrace -e 'tracepoint:kvm:kvm_exit { @exits = count(); }' </dev/null >/tmp/bt.out 2>/tmp/bt.err &
        BT=$!
        n=0
        until grep -q '^Attaching' /tmp/bt.out 2>/dev/null; do
            kill -0 $BT 2>/dev/null || { cat /tmp/bt.out /tmp/bt.err; finish fail "bpftrace exited"; }
            n=$((n + 1))
            [ $n -lt 6000 ] || finish fail "bpftrace did not attach"
            sleep 0.1
        done
        measure bpftrace $round
        kill -INT $BT
        wait $BT
        section bpftrace r$round /tmp/bt.out
    fi

    measure_crowd stock-crowd $round
    kvmtrace_start cc$round --counts-only
    measure_crowd kvmtrace-counts-crowd $round $KT
    kvmtrace_stop cc$round
    kvmtrace_start rc$round
    measure_crowd kvmtrace-crowd $round $KT
    kvmtrace_stop rc$round

    if [ "$PARTS" = all ]; then
        unload
        load patched
        measure patched $round
        unload
        load no-cycles
        measure patched-no-cycles $round
        unload
        load unpatched
        measure unpatched $round
        unload
        load stock
    fi
done

step bpf-stats $ROUND_BUDGET
echo 1 > /proc/sys/kernel/bpf_stats_enabled || finish fail "no kernel.bpf_stats_enabled"
kvmtrace_start stats
measure kvmtrace-stats 1
kvmtrace_stop stats
kvmtrace_start stats-counts --counts-only
measure kvmtrace-counts-stats 1
kvmtrace_stop stats-counts
# The same programs in a crowd: their run time per exit with CROWD VMs at once.
kvmtrace_start stats-crowd
measure_crowd kvmtrace-crowd-stats 1 $KT
kvmtrace_stop stats-crowd
kvmtrace_start stats-counts-crowd --counts-only
measure_crowd kvmtrace-counts-crowd-stats 1 $KT
kvmtrace_stop stats-counts-crowd
echo 0 > /proc/sys/kernel/bpf_stats_enabled

# One scrape of `kvmtrace export` with EXPORT_VMS VMs' series (VMs that ran and ended,
# kept for the retention), SCRAPES times: its time and bytes.
step export-scrape $ROUND_BUDGET
ip link set lo up || finish fail "no loopback"
kvmtrace export --listen 127.0.0.1:10470 --time --retention 3600 </dev/null 2>/tmp/export.err &
EXP=$!
n=0
until grep -q "serving KVM exit metrics" /tmp/export.err; do
    kill -0 $EXP 2>/dev/null || { cat /tmp/export.err; finish fail "kvmtrace export exited"; }
    n=$((n + 1))
    [ $n -lt 600 ] || finish fail "kvmtrace export did not start"
    sleep 0.2
done
n=0
vms=
while [ $n -lt $EXPORT_VMS ]; do
    /bin/micro 10 0 > /dev/null 2>&1 &
    vms="$vms $!"
    n=$((n + 1))
    # 256 at a time; the VMs only (the exporter runs in the background too).
    if [ $((n % 256)) = 0 ] || [ $n = $EXPORT_VMS ]; then
        wait $vms
        vms=
        say "export vms=$n at=$(up)"
    fi
done
t0=$(up)
wget -q -O /tmp/scrape.txt http://127.0.0.1:10470/metrics || finish fail "scrape"
say "export first-scrape from=$t0 to=$(up)"
t0=$(up)
n=0
while [ $n -lt $SCRAPES ]; do
    wget -q -O /tmp/scrape.txt http://127.0.0.1:10470/metrics || finish fail "scrape"
    n=$((n + 1))
    say "export scrape=$n at=$(up)"
done
t1=$(up)
vms=$(sed -n 's/^kvmtrace_exits_total{.*vm="\([^"]*\)".*/\1/p' /tmp/scrape.txt | sort -u | wc -l)
series=$(grep -c '^kvmtrace_' /tmp/scrape.txt)
say "scrape vms=$vms series=$series bytes=$(wc -c < /tmp/scrape.txt) scrapes=$SCRAPES from=$t0 to=$t1"
kill -TERM $EXP
wait $EXP
finish pass

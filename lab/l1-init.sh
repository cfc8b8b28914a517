#!/bin/busybox sh
# L1 /init of `cargo xtask lab`: runs inside the emulated host (Bochs or QEMU TCG).
#
# For each paging mode in /lab/env: load the kvm vendor module with that mode, arm the
# kernel's hist trigger on kvm:kvm_exit (the ground truth), run /lab/workload (under
# `kvmtrace record` when it is there), disarm, and print everything between markers on
# the console, which xtask parses (the protocol is in lab/l1-lib.sh). Lines from the L2
# console are prefixed with "L2| ".
#
# SCENARIO (in /lab/env) says how kvmtrace runs:
#   modes   one `kvmtrace record -- workload` per paging mode (the default);
#   reload  one `kvmtrace record` across all modes, started before the vendor module is
#           first loaded: each mode is an rmmod + insmod while it runs;
#   signal  each mode's `kvmtrace record -- workload` gets the next signal of SIGNALS
#           SIGNAL_AFTER seconds in, while the workload still runs;
#   export  one `kvmtrace export` across all modes, over TLS with a client certificate
#           and a password (/lab/tls), on eth0 (QEMU forwards its port
#           to the host, where Prometheus scrapes it); after each mode's VM ends, its
#           scrape is printed, and again after EXPORT_RETENTION, when it must be gone.
export PATH=/bin
. /lab/lib.sh
set -o pipefail
. /lab/env

EXIT=/sys/kernel/tracing/events/kvm/kvm_exit
# The kernel's tracing map drops an event when two CPUs insert the same new key at once
# and the one that waits for the other gives up after map-size tries
# (kernel/trace/tracing_map.c, __tracing_map_insert). Under multi-threaded TCG a CPU
# can stall that long: with more than one CPU, maps of 2^15 entries wait 2^16 tries.
# A drop still fails the run (xtask reads the hist's Dropped line).
if [ "$(grep -c ^processor /proc/cpuinfo)" -gt 1 ]; then
    REASON_SIZE=32768; VCPU_SIZE=32768
else
    REASON_SIZE=256; VCPU_SIZE=1024
fi
BY_REASON="hist:keys=isa,exit_reason:vals=hitcount:sort=isa,exit_reason:size=$REASON_SIZE"
BY_VCPU="hist:keys=vcpu_id,exit_reason:vals=hitcount:sort=vcpu_id,exit_reason:size=$VCPU_SIZE"
# The crowd (CROWD=1): per thread too, for each VM's own row.
BY_THREAD="hist:keys=common_pid,exit_reason:vals=hitcount:sort=common_pid,exit_reason:size=32768"
# With DETAIL=1 / RIPS=1 (kvmtrace records --detail / --rip): the kernel's own counts
# keyed as kvmtrace's detail and RIP rows are (xtask decodes them the same way).
KVM_EV=/sys/kernel/tracing/events/kvm
# The filters come from the model's detail plan (DETAIL_*_IF in /lab/env).
VECTOR_T="hist:keys=exit_reason,intr_info:vals=hitcount:size=256 if $DETAIL_VECTOR_IF"
INFO1_T="hist:keys=isa,exit_reason,info1:vals=hitcount:size=4096 if $DETAIL_INFO1_IF"
MSR_T='hist:keys=ecx,write:vals=hitcount:size=1024'
CPUID_T='hist:keys=function:vals=hitcount:size=1024'
PF_T='hist:keys=fault_address.buckets=1048576:vals=hitcount:size=4096'
RIP_T='hist:keys=exit_reason,guest_rip:vals=hitcount:size=32768'

# The ground truth: the hist triggers, or where the kernel has none (Debian's 5.10 is
# built without CONFIG_HIST_TRIGGERS) every kvm_exit record in the trace buffer,
# counted per vCPU and printed reason after the run. xtask maps the names back to
# codes through the event's own format, and fails on lost events or unread lines.
# (REFERENCE is set once kvm.ko, which defines kvm_exit, is loaded.)
TRACING=/sys/kernel/tracing
# Per CPU: ~70 bytes a record, so room for ~900 000 exits.
TRACE_BUFFER_KB=65536
reference_arm() {
    if [ $REFERENCE = hist ]; then
        echo "$BY_REASON" > $EXIT/trigger && echo "$BY_VCPU" >> $EXIT/trigger || return 1
        if [ "$CROWD" = 1 ]; then
            echo "$BY_THREAD" >> $EXIT/trigger || return 1
        fi
        return
    fi
    echo 0 > $TRACING/tracing_on && echo 0 > $EXIT/enable \
        && echo $TRACE_BUFFER_KB > $TRACING/buffer_size_kb && echo > $TRACING/trace \
        && echo 1 > $EXIT/enable && echo 1 > $TRACING/tracing_on
}
reference_disarm() {
    if [ $REFERENCE = hist ]; then
        [ "$CROWD" = 1 ] && echo "!$BY_THREAD" >> $EXIT/trigger
        echo "!$BY_VCPU" >> $EXIT/trigger; echo "!$BY_REASON" >> $EXIT/trigger
    else
        echo 0 > $TRACING/tracing_on; echo 0 > $EXIT/enable
    fi
}
reference_dump() { # TAG
    if [ $REFERENCE = hist ]; then
        section hist $1 $EXIT/hist
        return
    fi
    echo 0 > $TRACING/tracing_on
    awk '/^#/ { next }
        { i = index($0, " kvm_exit: "); r = index($0, " reason "); p = index($0, " rip ")
          v = match($0, / vcpu [0-9]+/)
          if (i == 0 || r == 0 || p <= r || v == 0) {
              bad++; if (bad <= 3) print "# unmatched-line " $0; next }
          vcpu = substr($0, RSTART + 6, RLENGTH - 6)
          n[vcpu " reason " substr($0, r + 8, p - r - 8)]++; all++ }
        END { for (k in n) print n[k], "vcpu", k
              print "# counted", all + 0, "unmatched", bad + 0 }' $TRACING/trace > /tmp/trace-counts.txt
    grep -m1 'entries-in-buffer/entries-written' $TRACING/trace >> /tmp/trace-counts.txt
    cat $TRACING/per_cpu/cpu*/stats | grep -E '^(overrun|commit overrun|dropped events):' >> /tmp/trace-counts.txt
    section trace-counts $1 /tmp/trace-counts.txt
    section kvm-exit-format $1 $EXIT/format
}

# Arms the detail and RIP triggers; `detail_triggers !` disarms them.
detail_triggers() {
    if [ "$DETAIL" = 1 ]; then
        echo "$1$VECTOR_T" >> $EXIT/trigger || return 1
        echo "$1$INFO1_T" >> $EXIT/trigger || return 1
        echo "$1$MSR_T" >> $KVM_EV/kvm_msr/trigger || return 1
        echo "$1$CPUID_T" >> $KVM_EV/kvm_cpuid/trigger || return 1
        echo "$1$PF_T" >> $KVM_EV/kvm_page_fault/trigger || return 1
    fi
    if [ "$RIPS" = 1 ]; then
        echo "$1$RIP_T" >> $EXIT/trigger || return 1
    fi
    return 0
}

step l1-modules 120
say "l1 up uptime=$(up) kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for m in $KVM_DEPS; do
    insmod /lib/modules/lab/$m || finish fail "insmod $m"
done
[ -e $EXIT/format ] || finish fail "no kvm:kvm_exit after loading $KVM_DEPS"

# --install deb (INSTALL=deb): the package of `cargo xtask dist` (/lab/kvmtrace.deb),
# installed with dpkg -i; from then on `kvmtrace` is /usr/bin/kvmtrace as the
# exporter's unit runs it: uid 65534, exactly the unit's capabilities (UNIT_CAPS) as
# ambient ones and nothing else, no memlock limit (the unit's LimitMEMLOCK=infinity).
setpriv_caps() { # [CAP]: UNIT_CAPS without CAP, as setpriv takes them (-all,+bpf,...)
    out=-all
    for c in $UNIT_CAPS; do
        [ "$c" = "$1" ] || out="$out,+$(echo ${c#CAP_} | tr A-Z a-z)"
    done
    echo $out
}
as_unit() { # CAPS PROGRAM [ARGS]: as the unit's user with CAPS only
    caps=$1
    shift
    ulimit -l unlimited
    /usr/bin/setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=$caps \
        --ambient-caps=$caps --bounding-set=$caps "$@"
}
install_deb() {
    step deb:install 600
    mkdir -p /var/lib/dpkg/info /var/lib/dpkg/updates /var/lib/dpkg/triggers /var/log \
        /usr/sbin /etc
    touch /var/lib/dpkg/available
    # The package depends on procps for the unit's ExecReload=/bin/kill: here busybox
    # is /bin/kill, and this L1's dpkg database says so.
    printf 'Package: procps\nStatus: install ok installed\nPriority: important\nSection: admin\nMaintainer: kvmtrace lab\nArchitecture: amd64\nVersion: 2:4.0.2-3\nDescription: /bin/kill (busybox in this L1)\n\n' \
        > /var/lib/dpkg/status
    # dpkg wants ldconfig in PATH; a static kvmtrace needs no ld.so cache.
    printf '#!/bin/sh\nexit 0\n' > /usr/sbin/ldconfig
    chmod 755 /usr/sbin/ldconfig
    PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg -i /lab/kvmtrace.deb >/tmp/dpkg.out 2>&1 \
        || { cat /tmp/dpkg.out; finish fail "dpkg -i kvmtrace.deb failed"; }
    section dpkg install /tmp/dpkg.out
    [ -x /usr/bin/kvmtrace ] || finish fail "the .deb installed no /usr/bin/kvmtrace"
    say "deb installed $(PATH=/usr/bin:/bin dpkg-query -W kvmtrace) caps=$UNIT_CAPS"
    # With one capability fewer: no record, and one line that names what is missing.
    for c in $UNIT_CAPS; do
        as_unit $(setpriv_caps $c) /usr/bin/kvmtrace record -d 0.1 -o /tmp/capcheck.json \
            </dev/null >/dev/null 2>/tmp/capcheck.err \
            && finish fail "kvmtrace recorded without $c"
        lines=$(wc -l < /tmp/capcheck.err)
        if [ "$lines" != 1 ] || ! grep -q "$c" /tmp/capcheck.err; then
            cat /tmp/capcheck.err
            finish fail "without $c kvmtrace said $lines lines, not one that names $c"
        fi
        say "deb without $c: $(cat /tmp/capcheck.err)"
    done
    all=$(setpriv_caps)
    # Debian's kernels default to kernel.perf_event_paranoid=3, where (its patch) only
    # CAP_SYS_ADMIN may open the perf events that attach tracepoint programs: that is
    # said in one line naming the sysctl. The unit's documentation sets it to 2.
    paranoid=$(cat /proc/sys/kernel/perf_event_paranoid)
    if as_unit $all /usr/bin/kvmtrace record -d 0.1 -o /tmp/capcheck.json </dev/null \
        >/dev/null 2>/tmp/capcheck.err; then
        say "deb perf_event_paranoid=$paranoid: the unit's capabilities suffice"
    else
        lines=$(wc -l < /tmp/capcheck.err)
        if [ "$lines" != 1 ] || ! grep -q "perf_event_paranoid" /tmp/capcheck.err; then
            cat /tmp/capcheck.err
            finish fail "with perf_event_paranoid=$paranoid kvmtrace said $lines lines, not one that names the sysctl"
        fi
        say "deb perf_event_paranoid=$paranoid: $(cat /tmp/capcheck.err)"
        echo 2 > /proc/sys/kernel/perf_event_paranoid || finish fail "cannot set perf_event_paranoid"
        say "deb perf_event_paranoid=2 from here on, as the unit's documentation says"
    fi
    # Both commands the package runs, as its user, before the scenario runs one of them.
    for cmd in "record -d 0.2 -o /tmp/capcheck.json" "top -n 1"; do
        as_unit $all /usr/bin/kvmtrace $cmd </dev/null >/tmp/capcheck.out 2>/tmp/capcheck.err \
            || { cat /tmp/capcheck.err; finish fail "kvmtrace $cmd failed as the unit's user"; }
    done
    say "deb record and top ran as the unit's user"
    rm -f /bin/kvmtrace
    printf '#!/bin/sh\n# kvmtrace as the unit runs it (written by /init).\nulimit -l unlimited\nexec /usr/bin/setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=%s --ambient-caps=%s --bounding-set=%s /usr/bin/kvmtrace "$@"\n' \
        $all $all $all > /bin/kvmtrace
    chmod 755 /bin/kvmtrace
    # The workload runs as kvmtrace's child, as that user: KVM's device must let it.
    say "deb kvmtrace runs as uid 65534 with $all"
}
if [ "$INSTALL" = deb ]; then
    install_deb
fi
if [ -e $EXIT/hist ]; then
    REFERENCE=hist DUMP_BUDGET=120
else
    REFERENCE=trace DUMP_BUDGET=900
fi
say "reference $REFERENCE"

# With PERF=1: `perf kvm stat record -a` beside kvmtrace, from before the workload to
# after it; its ioport and vmexit reports go to the console.
perf_start() {
    [ "$PERF" = 1 ] || return 0
    rm -f /tmp/perf.data
    /usr/bin/perf kvm stat record -a -o /tmp/perf.data </dev/null >/tmp/perf.err 2>&1 &
    PERF_PID=$!
    n=0
    until [ -s /tmp/perf.data ]; do
        kill -0 $PERF_PID 2>/dev/null || { cat /tmp/perf.err; finish fail "perf exited"; }
        n=$((n + 1))
        [ $n -lt 600 ] || finish fail "perf did not start"
        sleep 0.1
    done
}
perf_stop() { # TAG
    [ "$PERF" = 1 ] || return 0
    kill -INT $PERF_PID
    wait $PERF_PID
    for event in ioport vmexit; do
        /usr/bin/perf kvm -i /tmp/perf.data stat report --event=$event >/tmp/perf-$event.txt 2>&1
        section perf-$event $1 /tmp/perf-$event.txt
    done
    section perf-stderr $1 /tmp/perf.err
    rm -f /tmp/perf.data
}

# Runs the workload alone: the L2 console goes to ours and /tmp/l2.out.
workload() {
    timeout $RUN_TIMEOUT /lab/workload </dev/null 2>&1 | tee /tmp/l2.out | sed 's/^/L2| /'
}
available_kb() { sed -n 's/^MemAvailable: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
# The crowd: L1's least MemAvailable while its VMs run (sampled every 0.2 s), so that
# xtask can say what a VM takes.
memory_watch() {
    least=$(available_kb)
    while :; do
        now=$(available_kb)
        [ "$now" -lt "$least" ] && least=$now && echo $least > /tmp/mem.least
        sleep 0.2
    done
}

# --scenario export: the network, and the exporter.
export_start() {
    step export:attach 300
    for m in $NET_MODULES; do
        insmod /lib/modules/net/$m || finish fail "insmod $m"
    done
    ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 \
        || finish fail "cannot bring up eth0"
    kvmtrace export --listen 0.0.0.0:$EXPORT_PORT --time --retention $EXPORT_RETENTION \
        --web-config /lab/tls/web-config.yml </dev/null 2>/tmp/kvmtrace-all.err &
    KT=$!
    n=0
    until grep -q "serving KVM exit metrics" /tmp/kvmtrace-all.err; do
        kill -0 $KT 2>/dev/null || { cat /tmp/kvmtrace-all.err; finish fail "kvmtrace export exited"; }
        n=$((n + 1))
        [ $n -lt 1200 ] || finish fail "kvmtrace export did not start"
        sleep 0.1
    done
    say "export serving uptime=$(up)"
    # Served over TLS only, to a client with the lab CA's certificate and the password.
    wget -q -O /tmp/plain.txt http://127.0.0.1:$EXPORT_PORT/metrics 2>/dev/null \
        && finish fail "the exporter served plain HTTP on its TLS port"
    code=$(/usr/bin/curl -s -o /dev/null -w '%{http_code}' --cacert /lab/tls/ca.crt \
        --cert /lab/tls/client.crt --key /lab/tls/client.key \
        https://127.0.0.1:$EXPORT_PORT/metrics)
    [ "$code" = 401 ] || finish fail "a scrape without the password got HTTP $code, not 401"
    /usr/bin/curl -s -o /dev/null --cacert /lab/tls/ca.crt -u prometheus:$(cat /lab/tls/password) \
        https://127.0.0.1:$EXPORT_PORT/metrics \
        && finish fail "a scrape without a client certificate was served"
    say "export refused plain HTTP, no password (401) and no client certificate"
}
scrape() { # SECTION TAG
    /usr/bin/curl -sS --fail -o /tmp/metrics.txt --cacert /lab/tls/ca.crt \
        --cert /lab/tls/client.crt --key /lab/tls/client.key \
        -u prometheus:$(cat /lab/tls/password) https://127.0.0.1:$EXPORT_PORT/metrics \
        2>/tmp/curl.err || { echo "scrape failed: $(cat /tmp/curl.err)" > /tmp/metrics.txt; }
    section $1 $2 /tmp/metrics.txt
}

failed=""
if [ "$SCENARIO" = export ]; then
    export_start
fi
if [ "$SCENARIO" = reload ]; then
    step reload:attach 300
    kvmtrace record --format json -o /tmp/rec-all.json $RECORD_ARGS </dev/null 2>/tmp/kvmtrace-all.err &
    KT=$!
    attached $KT /tmp/kvmtrace-all.err || { cat /tmp/kvmtrace-all.err; finish fail "kvmtrace did not attach"; }
    say "reload kvmtrace attached uptime=$(up)"
fi
for mode in $MODES; do
    tag=$PAGING$mode
    step "$tag:load" 120
    insmod /lib/modules/lab/$KVM_VENDOR.ko $PAGING=$mode || finish fail "insmod $KVM_VENDOR.ko $PAGING=$mode"
    [ -c /dev/kvm ] || finish fail "no /dev/kvm with $PAGING=$mode"
    # --install deb: the workload runs as kvmtrace's unprivileged user.
    [ "$INSTALL" = deb ] && chmod 666 /dev/kvm
    say "paging $tag $PAGING=$(cat /sys/module/$KVM_MODULE/parameters/$PAGING)"

    reference_arm || finish fail "cannot arm the $REFERENCE reference"
    detail_triggers "" || finish fail "cannot arm the detail triggers"
    step "$tag:run" $RUN_BUDGET
    if [ "$CROWD" = 1 ]; then
        before_kb=$(available_kb)
        echo $before_kb > /tmp/mem.least
        memory_watch &
        MEMWATCH=$!
    fi
    say "run $tag start uptime=$(up)"
    rm -f /tmp/rec.json /tmp/l2.out /tmp/kvmtrace.err
    expect_end=1
    # The workload's VM is named after the mode (QEMU's -name guest=l2-$KVMLAB_TAG).
    export KVMLAB_TAG=$tag
    if [ ! -x /bin/kvmtrace ] || [ "$SCENARIO" = reload ] || [ "$SCENARIO" = export ]; then
        workload
        rc=$?
    elif [ "$SCENARIO" = signal ]; then
        sig=${SIGNALS%% *}
        SIGNALS="${SIGNALS#* } $sig"
        kvmtrace record --format json -o /tmp/rec.json $RECORD_ARGS \
            -- /lab/workload </dev/null >/tmp/l2.out 2>/tmp/kvmtrace.err &
        KT=$!
        attached $KT /tmp/kvmtrace.err || finish fail "kvmtrace did not attach"
        sleep $SIGNAL_AFTER
        grep -q "$END_MARKER" /tmp/l2.out && finish fail "$tag: the workload ended before the signal"
        say "run $tag signal $sig uptime=$(up)"
        kill -$sig $KT
        wait $KT
        rc=$?
        sed 's/^/L2| /' /tmp/l2.out
        say "run $tag kvmtrace rc=$rc uptime=$(up)"
        section kvmtrace-stderr $tag /tmp/kvmtrace.err
        expect_end=0
    else
        perf_start
        timeout $RUN_TIMEOUT kvmtrace record --format json -o /tmp/rec.json $RECORD_ARGS \
            -- /lab/workload </dev/null 2>/tmp/kvmtrace.err | tee /tmp/l2.out | sed 's/^/L2| /'
        rc=$?
        perf_stop $tag
        say "run $tag kvmtrace rc=$rc uptime=$(up)"
        section kvmtrace-stderr $tag /tmp/kvmtrace.err
        if ! grep -q "$END_MARKER" /tmp/l2.out; then
            # kvmtrace did not get the workload to its end: still get the ground truth.
            reference_disarm
            reference_arm || finish fail "cannot arm the $REFERENCE reference"
            say "run $tag without kvmtrace uptime=$(up)"
            workload
            rc=$?
        fi
    fi
    say "run $tag end rc=$rc uptime=$(up)"
    if [ "$CROWD" = 1 ]; then
        kill $MEMWATCH
        wait $MEMWATCH 2>/dev/null
        say "memory $tag available_before_kb=$before_kb least_available_kb=$(cat /tmp/mem.least)"
    fi
    if [ $expect_end = 1 ]; then
        grep -q "$END_MARKER" /tmp/l2.out || failed="$failed $tag:no-end-marker"
    fi
    if [ "$SCENARIO" = export ]; then
        # A few of Prometheus's 1 s scrapes see the final counts; then the series
        # must leave with the retention.
        sleep 3
        say "export $tag final uptime=$(up)"
        scrape metrics $tag
        sleep $((EXPORT_RETENTION + 3))
        say "export $tag retention uptime=$(up)"
        scrape metrics-after $tag
    fi

    step "$tag:dump" $DUMP_BUDGET
    reference_dump $tag
    if [ "$DETAIL" = 1 ]; then
        section detail-msr $tag $KVM_EV/kvm_msr/hist
        section detail-cpuid $tag $KVM_EV/kvm_cpuid/hist
        section detail-pf $tag $KVM_EV/kvm_page_fault/hist
    fi
    [ -e /tmp/rec.json ] && section record $tag /tmp/rec.json
    # How much the kernel logged, then anything it complained about (nothing when healthy).
    echo "dmesg lines=$(dmesg | wc -l)" > /tmp/dmesg-bad.txt
    dmesg | grep -E 'BUG|WARNING|Oops|general protection|Call Trace|UBSAN' >> /tmp/dmesg-bad.txt
    section dmesg-bad $tag /tmp/dmesg-bad.txt
    reference_disarm
    detail_triggers ! || finish fail "cannot disarm the detail triggers"
    rmmod $KVM_MODULE || finish fail "rmmod $KVM_MODULE"
done
if [ "$SCENARIO" = reload ]; then
    step reload:stop 300
    kill -INT $KT
    wait $KT
    say "reload kvmtrace rc=$? uptime=$(up)"
    section kvmtrace-stderr all /tmp/kvmtrace-all.err
    [ -e /tmp/rec-all.json ] && section record all /tmp/rec-all.json
fi

if [ "$SCENARIO" = export ]; then
    step export:stop 60
    kill -TERM $KT
    wait $KT
    say "export kvmtrace rc=$? uptime=$(up)"
    section kvmtrace-stderr all /tmp/kvmtrace-all.err
fi

step done 60
if [ -z "$failed" ]; then finish pass; else finish fail$failed; fi

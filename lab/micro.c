/*
 * micro: the deterministic KVM payload of `cargo xtask lab --workload micro`.
 *
 *     micro CPUIDS OUTS [VCPUS]
 *
 * One VM with VCPUS vCPUs (1..=8, default 1), each run by a thread of its own. All run
 * the same guest code on the same memory: 64-bit mode (identity-mapped 2 MiB page,
 * interrupts off, no stack), CPUID CPUIDS times, a byte to port MICRO_PORT OUTS times,
 * then HLT. No in-kernel irqchip, so every one of those reaches KVM as exactly one exit:
 * per vCPU CPUIDS x CPUID, OUTS x I/O instruction, 1 x HLT (other reasons, e.g. external
 * interrupts or paging, come from the host and are not fixed). The threads wait for
 * each other (a barrier) before their first KVM_RUN, so the vCPUs really run at the
 * same time. Each vCPU prints what it read from the counter leaves; the main thread
 * prints the VM's counts and the lab's end marker.
 */
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MICRO_PORT 0x1e0
#define MICRO_MSR 0xc0000080 /* EFER: every ISA intercepts it, and rewriting it is harmless */
#define MEM_SIZE 0x200000ul  /* one 2 MiB page */
#define PML4 0x1000ul
#define PDPT 0x2000ul
#define PD 0x3000ul
#define CODE 0x10000ul
#define MAX_VCPUS 8
#define STR(x) #x
#define XSTR(x) STR(x)

/*
 * RDI = CPUIDs to run (leaf 0), RSI = port writes to do (one byte to MICRO_PORT), R13 =
 * MSR round trips (RDMSR then WRMSR of the same value to EFER). Then the guest reads the patched KVM's
 * counters: leaf 0x4FFFFFFE for reason R8 (CPUID) into R10, for reason R9 (I/O) into
 * R11, and the total leaf 0x4FFFFFFF into R12, and halts; the VMM prints them. Only
 * registers: every vCPU runs this same code, and there is no stack.
 */
__asm__(".pushsection .rodata\n"
        ".globl guest_code, guest_code_end\n"
        "guest_code:\n"
        "1:  test %rdi, %rdi\n"
        "    jz 2f\n"
        "    xor %eax, %eax\n"
        "    xor %ecx, %ecx\n"
        "    cpuid\n"
        "    dec %rdi\n"
        "    jmp 1b\n"
        "2:  mov $" XSTR(MICRO_PORT) ", %dx\n"
        "3:  test %rsi, %rsi\n"
        "    jz 6f\n"
        "    mov %sil, %al\n"
        "    out %al, (%dx)\n"
        "    dec %rsi\n"
        "    jmp 3b\n"
        "6:  test %r13, %r13\n"
        "    jz 7f\n"
        "    mov $" XSTR(MICRO_MSR) ", %ecx\n"
        "    rdmsr\n"
        "    wrmsr\n"
        "    dec %r13\n"
        "    jmp 6b\n"
        "7:  mov $0x4ffffffe, %eax\n"
        "    mov %r8d, %ecx\n"
        "    cpuid\n"
        "    mov %eax, %r10d\n"
        "    mov $0x4ffffffe, %eax\n"
        "    mov %r9d, %ecx\n"
        "    cpuid\n"
        "    mov %eax, %r11d\n"
        "    mov $0x4fffffff, %eax\n"
        "    cpuid\n"
        "    mov %eax, %r12d\n"
        "5:  hlt\n"
        "    jmp 5b\n"
        "guest_code_end:\n"
        ".popsection\n");
extern const uint8_t guest_code[], guest_code_end[];

/* One vCPU and its thread. */
struct vcpu {
    int id;
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    /* Filled in by the thread. */
    unsigned long seen_outs, runs;
    struct timespec halted;
    /* The thread's own CPU time from the start to its HLT exit: the guest's run, the
     * exits' handling and any tracer's programs on them, without the other VMs. */
    long long cpu_ns;
};

static unsigned long cpuids, outs, msrs;
static pthread_barrier_t start;
static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what)
{
    fprintf(stderr, "micro: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* A failure of one vCPU's ioctl: the whole VMM stops. */
static void die_vcpu(const struct vcpu *v, const char *what)
{
    fprintf(stderr, "micro: vcpu %d: %s: %s\n", v->id, what, strerror(errno));
    exit(1);
}

static void fail_vcpu(const struct vcpu *v, const char *what, unsigned long long value)
{
    fprintf(stderr, "micro: vcpu %d: %s 0x%llx\n", v->id, what, value);
    exit(1);
}

static unsigned long arg(const char *s, const char *what, unsigned long min, unsigned long max)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || !*s || *end || *s == '-' || v < min || v > max) {
        fprintf(stderr, "micro: bad %s %s (want %lu..=%lu)\n", what, s, min, max);
        exit(2);
    }
    return v;
}

/* Creates vCPU `id` of `vm` in 64-bit mode at the guest code, with its counts. */
static void setup_vcpu(int vm, struct vcpu *v, int id, const struct kvm_cpuid2 *cpuid,
                       int run_size, int amd)
{
    v->id = id;
    v->fd = ioctl(vm, KVM_CREATE_VCPU, id);
    if (v->fd < 0)
        die_vcpu(v, "KVM_CREATE_VCPU");
    /* KVM refuses EFER.LME unless the guest's CPUID has long mode. */
    if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0)
        die_vcpu(v, "KVM_SET_CPUID2");
    v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED)
        die_vcpu(v, "mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        die_vcpu(v, "KVM_GET_SREGS");
    sregs.cr3 = PML4;
    sregs.cr4 = 1u << 5;                 /* PAE */
    sregs.cr0 = 0x80050033;              /* PG WP AM NE ET MP PE */
    sregs.efer = (1u << 8) | (1u << 10); /* LME LMA */
    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
        .present = 1, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1,
    };
    struct kvm_segment data = code;
    data.selector = 16;
    data.type = 3;
    data.l = 0;
    data.db = 1;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
        die_vcpu(v, "KVM_SET_SREGS");
    /* The CPUID and I/O exit reasons of this CPU's vendor: VMX 10 and 30, SVM 0x72
     * and 0x7b. */
    struct kvm_regs regs = {
        .rip = CODE, .rflags = 2, .rdi = cpuids, .rsi = outs, .r13 = msrs,
        .r8 = amd ? 0x72 : 10, .r9 = amd ? 0x7b : 30,
    };
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        die_vcpu(v, "KVM_SET_REGS");
}

/* Runs one vCPU to its HLT and prints what it read from the leaves. */
static void *run_vcpu(void *arg)
{
    struct vcpu *v = arg;
    struct kvm_run *run = v->run;
    int rc = pthread_barrier_wait(&start);
    if (rc != 0 && rc != PTHREAD_BARRIER_SERIAL_THREAD) {
        errno = rc;
        die_vcpu(v, "pthread_barrier_wait");
    }
    struct timespec cpu0, cpu1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu0);
    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die_vcpu(v, "KVM_RUN");
        }
        v->runs++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.port != MICRO_PORT || run->io.direction != KVM_EXIT_IO_OUT)
                fail_vcpu(v, "unexpected I/O port", run->io.port);
            v->seen_outs += run->io.count;
            break;
        case KVM_EXIT_HLT: {
            clock_gettime(CLOCK_MONOTONIC, &v->halted);
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu1);
            v->cpu_ns = (long long)(cpu1.tv_sec - cpu0.tv_sec) * 1000000000ll +
                        (cpu1.tv_nsec - cpu0.tv_nsec);
            struct kvm_regs regs;
            if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
                die_vcpu(v, "KVM_GET_REGS");
            /* Read before the HLT exit: each count includes its own CPUID query. */
            pthread_mutex_lock(&print_lock);
            printf("micro: leaves cpuid=%llu io=%llu total=%llu vcpu=%d\n",
                   (unsigned long long)regs.r10, (unsigned long long)regs.r11,
                   (unsigned long long)regs.r12, v->id);
            fflush(stdout);
            pthread_mutex_unlock(&print_lock);
            return NULL;
        }
        case KVM_EXIT_FAIL_ENTRY:
            fail_vcpu(v, "failed entry, reason",
                      (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            break;
        case KVM_EXIT_INTERNAL_ERROR:
            fail_vcpu(v, "KVM internal error, suberror", run->internal.suberror);
            break;
        default:
            fail_vcpu(v, "unexpected exit", run->exit_reason);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: micro CPUIDS OUTS [VCPUS [MSRS]]\n");
        return 2;
    }
    cpuids = arg(argv[1], "count", 0, 0xffffffffu);
    outs = arg(argv[2], "count", 0, 0xffffffffu);
    int nvcpus = argc >= 4 ? (int)arg(argv[3], "vCPU count", 1, MAX_VCPUS) : 1;
    msrs = argc == 5 ? arg(argv[4], "MSR count", 0, 0xffffffffu) : 0;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        die("KVM_GET_API_VERSION");
    int max = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
    if (max > 0 && nvcpus > max) {
        fprintf(stderr, "micro: %d vCPUs asked, KVM allows %d\n", nvcpus, max);
        return 2;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    /* Needed by VMX without unrestricted guest (ept=0); harmless elsewhere. */
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0)
        die("KVM_SET_TSS_ADDR");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = MEM_SIZE,
        .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT),
             *pd = (uint64_t *)(mem + PD);
    pml4[0] = PDPT | 3;      /* present, writable */
    pdpt[0] = PD | 3;
    pd[0] = 0 | 0x80 | 3;    /* 2 MiB page at 0 */
    memcpy(mem + CODE, guest_code, (size_t)(guest_code_end - guest_code));

    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(cpuid->entries[0]));
    if (!cpuid)
        die("calloc");
    cpuid->nent = nent;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    __get_cpuid(0, &eax, &ebx, &ecx, &edx);
    int amd = ebx == 0x68747541; /* "Auth" */

    struct vcpu vcpus[MAX_VCPUS] = {0};
    for (int i = 0; i < nvcpus; i++)
        setup_vcpu(vm, &vcpus[i], i, cpuid, run_size, amd);

    /* The vCPU threads and this one: the clock starts when all are ready. */
    int rc = pthread_barrier_init(&start, NULL, (unsigned)nvcpus + 1);
    if (rc != 0) {
        errno = rc;
        die("pthread_barrier_init");
    }
    for (int i = 0; i < nvcpus; i++) {
        rc = pthread_create(&vcpus[i].thread, NULL, run_vcpu, &vcpus[i]);
        if (rc != 0) {
            errno = rc;
            die("pthread_create");
        }
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = pthread_barrier_wait(&start);
    if (rc != 0 && rc != PTHREAD_BARRIER_SERIAL_THREAD) {
        errno = rc;
        die("pthread_barrier_wait");
    }
    unsigned long seen_outs = 0, runs = 0;
    long long cpu_ns = 0;
    struct timespec t1 = t0;
    int bad = 0;
    for (int i = 0; i < nvcpus; i++) {
        struct vcpu *v = &vcpus[i];
        rc = pthread_join(v->thread, NULL);
        if (rc != 0) {
            errno = rc;
            die("pthread_join");
        }
        seen_outs += v->seen_outs;
        runs += v->runs;
        cpu_ns += v->cpu_ns;
        if (v->halted.tv_sec > t1.tv_sec ||
            (v->halted.tv_sec == t1.tv_sec && v->halted.tv_nsec > t1.tv_nsec))
            t1 = v->halted;
        if (v->seen_outs != outs) {
            fprintf(stderr, "micro: vcpu %d: expected %lu port writes, saw %lu\n", v->id, outs,
                    v->seen_outs);
            bad = 1;
        }
    }
    /* The VM's counts: all vCPUs together. */
    printf("micro: cpuid=%lu out=%lu msr=%lu hlt=%d (userspace exits %lu)\n",
           cpuids * nvcpus, seen_outs, 2 * msrs * nvcpus, nvcpus, runs);
    /* From the first KVM_RUN to the last HLT exit: the guest's run, in L1 time. */
    printf("micro: run_ns=%lld\n",
           (long long)(t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec));
    /* The same run on L1's monotonic clock, for a crowd's span (first start, last end). */
    printf("micro: run_from_ns=%lld run_to_ns=%lld\n",
           (long long)t0.tv_sec * 1000000000ll + t0.tv_nsec,
           (long long)t1.tv_sec * 1000000000ll + t1.tv_nsec);
    /* The vCPU threads' CPU time, all together: what a crowd's VMs cost each other
     * nothing of (no waiting for a CPU, no other VM's work). */
    printf("micro: cpu_ns=%lld\n", cpu_ns);
    if (bad)
        return 1;
    printf("KVMLAB-L2 end\n");
    return 0;
}

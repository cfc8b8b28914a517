/*
 * micro: the deterministic KVM payload of `cargo xtask lab --workload micro`.
 *
 *     micro CPUIDS OUTS
 *
 * One vCPU starts in 64-bit mode (identity-mapped 2 MiB page, interrupts off) and runs
 * CPUID CPUIDS times, writes a byte to port MICRO_PORT OUTS times, then HLTs. No
 * in-kernel irqchip, so every one of those reaches KVM as exactly one exit:
 * CPUIDS x CPUID, OUTS x I/O instruction, 1 x HLT (other reasons, e.g. external
 * interrupts or paging, come from the host and are not fixed). Prints the counts it saw
 * and the lab's end marker.
 */
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MICRO_PORT 0x1e0
#define MEM_SIZE 0x200000ul  /* one 2 MiB page */
#define PML4 0x1000ul
#define PDPT 0x2000ul
#define PD 0x3000ul
#define CODE 0x10000ul
#define STR(x) #x
#define XSTR(x) STR(x)

/*
 * RDI = CPUIDs to run, RSI = port writes to do. Then the guest reads the patched KVM's
 * counters: leaf 0x4FFFFFFE for reason R8 (CPUID) into R10, for reason R9 (I/O) into
 * R11, and the total leaf 0x4FFFFFFF into R12, and halts; the VMM prints them.
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
        "    jz 4f\n"
        "    mov %sil, %al\n"
        "    out %al, (%dx)\n"
        "    dec %rsi\n"
        "    jmp 3b\n"
        "4:  mov $0x4ffffffe, %eax\n"
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

static void die(const char *what)
{
    fprintf(stderr, "micro: %s: %s\n", what, strerror(errno));
    exit(1);
}

static unsigned long arg(const char *s)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || *end || v > 0xffffffffu) {
        fprintf(stderr, "micro: bad count %s\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: micro CPUIDS OUTS\n");
        return 2;
    }
    unsigned long cpuids = arg(argv[1]), outs = arg(argv[2]);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        die("KVM_GET_API_VERSION");
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

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");

    /* KVM refuses EFER.LME unless the guest's CPUID has long mode. */
    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(cpuid->entries[0]));
    if (!cpuid)
        die("calloc");
    cpuid->nent = nent;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");

    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
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
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    /* The CPUID and I/O exit reasons of this CPU's vendor: VMX 10 and 30, SVM 0x72
     * and 0x7b. */
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    __get_cpuid(0, &eax, &ebx, &ecx, &edx);
    int amd = ebx == 0x68747541; /* "Auth" */
    struct kvm_regs regs = {
        .rip = CODE, .rflags = 2, .rdi = cpuids, .rsi = outs,
        .r8 = amd ? 0x72 : 10, .r9 = amd ? 0x7b : 30,
    };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    unsigned long seen_outs = 0, runs = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        runs++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.port != MICRO_PORT || run->io.direction != KVM_EXIT_IO_OUT) {
                fprintf(stderr, "micro: unexpected I/O port 0x%x\n", run->io.port);
                return 1;
            }
            seen_outs += run->io.count;
            break;
        case KVM_EXIT_HLT:
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("micro: cpuid=%lu out=%lu hlt=1 (userspace exits %lu)\n", cpuids, seen_outs, runs);
            /* From the first KVM_RUN to the HLT exit: the guest's run, in L1 time. */
            printf("micro: run_ns=%lld\n",
                   (long long)(t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec));
            if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
                die("KVM_GET_REGS");
            /* Read before the HLT exit: each count includes its own CPUID query. */
            printf("micro: leaves cpuid=%llu io=%llu total=%llu\n",
                   (unsigned long long)regs.r10, (unsigned long long)regs.r11,
                   (unsigned long long)regs.r12);
            if (seen_outs != outs) {
                fprintf(stderr, "micro: expected %lu port writes, saw %lu\n", outs, seen_outs);
                return 1;
            }
            printf("KVMLAB-L2 end\n");
            return 0;
        case KVM_EXIT_FAIL_ENTRY:
            fprintf(stderr, "micro: failed entry, reason 0x%llx\n",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            return 1;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "micro: KVM internal error, suberror %u\n", run->internal.suberror);
            return 1;
        default:
            fprintf(stderr, "micro: unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
}

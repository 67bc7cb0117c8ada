/* Start of day, the command line, and the workload runner. */
#include "boot.h"
#include "kernel.h"
#include "mm.h"
#include "x86.h"

#define DEFAULT_WORKLOADS "pagetable,irqflag,timer,cpuid_msr,mmio,console,compute"

struct options opt = {
	.workloads = DEFAULT_WORKLOADS,
	.repeat = 1,
	.compute = 10000,
	.ticks = 50,
	.hz = 1000,
	.console_lines = 64,
	.irqflag_rounds = 4096,
};

/* key=value options; anything else on the command line (a loader's file name) is ignored. */
static const struct {
	const char *key;
	const char **str;
	u64 *num;
} params[] = {
	{ "workloads", &opt.workloads, NULL },
	{ "repeat", NULL, &opt.repeat },
	{ "compute", NULL, &opt.compute },
	{ "ticks", NULL, &opt.ticks },
	{ "hz", NULL, &opt.hz },
	{ "console_lines", NULL, &opt.console_lines },
	{ "irqflag_rounds", NULL, &opt.irqflag_rounds },
};

static const struct {
	const char *name;
	workload_fn run;
} workloads[] = {
	{ "pagetable", wl_pagetable }, { "irqflag", wl_irqflag }, { "timer", wl_timer },
	{ "cpuid_msr", wl_cpuid_msr }, { "mmio", wl_mmio },	  { "console", wl_console },
	{ "compute", wl_compute },     { "fault", wl_fault },
};

static const char *const boot_sources[] = {
	[BOOT_SOURCE_ENTRY64] = "entry64",
	[BOOT_SOURCE_PVH] = "pvh",
	[BOOT_SOURCE_MULTIBOOT] = "multiboot",
};

#define CMDLINE_MAX 1024
static char cmdline[CMDLINE_MAX];

/* Copies what the loader gave us while its memory is still mapped; returns the boot source. */
static const char *take_boot_info(const struct boot_info *bi)
{
	if (!bi || bi->magic != BOOT_INFO_MAGIC)
		return boot_sources[BOOT_SOURCE_ENTRY64];
	const char *src = (const char *)bi->cmdline_paddr;
	for (size_t i = 0; src && src[i] && i < CMDLINE_MAX - 1; i++)
		cmdline[i] = src[i];
	return bi->boot_source < ARRAY_SIZE(boot_sources) ? boot_sources[bi->boot_source] : "unknown";
}

static bool parse_u64(const char *s, u64 *out)
{
	u64 v = 0;
	if (!*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return false;
		v = v * 10 + (u64)(*s - '0');
	}
	*out = v;
	return true;
}

/* Splits cmdline in place into NUL-terminated tokens and applies the key=value ones. */
static bool parse_cmdline(void)
{
	bool ok = true;
	for (char *p = cmdline; *p;) {
		char *tok = p;
		while (*p && *p != ' ')
			p++;
		if (*p)
			*p++ = 0;
		for (size_t i = 0; i < ARRAY_SIZE(params); i++) {
			size_t n = strlen(params[i].key);
			if (strncmp(tok, params[i].key, n) || tok[n] != '=')
				continue;
			if (params[i].str)
				*params[i].str = tok + n + 1;
			else if (!parse_u64(tok + n + 1, params[i].num)) {
				printk("ERROR bad number in \"%s\"\n", tok);
				ok = false;
			}
		}
	}
	if (opt.hz == 0) {
		printk("ERROR hz must be positive\n");
		ok = false;
	}
	return ok;
}

/* Index of the workload named name[0..len), or -1. */
static int find_workload(const char *name, size_t len)
{
	for (size_t i = 0; i < ARRAY_SIZE(workloads); i++)
		if (strlen(workloads[i].name) == len && !strncmp(workloads[i].name, name, len))
			return (int)i;
	return -1;
}

static size_t item_len(const char *s)
{
	size_t n = 0;
	while (s[n] && s[n] != ',')
		n++;
	return n;
}

static bool check_workload_list(void)
{
	bool ok = true;
	for (const char *w = opt.workloads; *w; w += item_len(w) + (w[item_len(w)] == ',')) {
		size_t n = item_len(w);
		if (find_workload(w, n) < 0) {
			char name[32] = { 0 };
			memcpy(name, w, n < sizeof(name) - 1 ? n : sizeof(name) - 1);
			printk("ERROR unknown workload \"%s\"\n", name);
			ok = false;
		}
	}
	return ok;
}

/* One pass over the list; seq numbers every WORKLOAD line of the whole run. */
static bool run_list(u64 *seq)
{
	bool pass = true;
	for (const char *w = opt.workloads; *w; w += item_len(w) + (w[item_len(w)] == ',')) {
		int i = find_workload(w, item_len(w));
		u64 checksum = 0;
		u64 t0 = rdtsc();
		const char *why = workloads[i].run(&checksum);
		u64 cycles = rdtsc() - t0;
#ifdef CHECK_CR3_READBACK
		/* Build option: each workload ends on the kernel's own page tables, and CR3 reads
		 * back the root the kernel loaded (whatever runs underneath). */
		if (!why && (read_cr3() & PTE_ADDR_MASK) != (u64)kernel_pml4)
			why = "CR3 does not read back the kernel's root table";
#endif
		++*seq;
		if (why) {
			printk("WORKLOAD %s FAIL seq=%lu reason: %s\n", workloads[i].name, *seq, why);
			pass = false;
		} else {
			printk("WORKLOAD %s PASS checksum=%016lx seq=%lu\n", workloads[i].name, checksum,
			       *seq);
		}
		printk("TIMING %s seq=%lu tsc=%lu\n", workloads[i].name, *seq, cycles);
	}
	return pass;
}

void __attribute__((noreturn)) kernel_main(const struct boot_info *bi)
{
	uart_init();
	const char *source = take_boot_info(bi);
	printk("kernel: boot=%s cmdline=\"%s\"\n", source, cmdline);
	bool pass = parse_cmdline();
	pass = check_workload_list() && pass;
	if (!pass) {
		con_write("RESULT FAIL\n");
		machine_exit(false);
	}

	gdt_init();
	idt_init();
	paging_init();
	pic_init();
	pit_set_hz((u32)opt.hz);
	sti();

	u64 seq = 0;
	for (u64 round = 0; pass && (opt.repeat == 0 || round < opt.repeat); round++)
		pass = run_list(&seq);

	if (stray_interrupts) {
		printk("ERROR %lu unexpected interrupts\n", stray_interrupts);
		pass = false;
	}
	con_write(pass ? "RESULT PASS\n" : "RESULT FAIL\n");
	machine_exit(pass);
}

/* Interrupt and exception dispatch, the 8259 PIC pair and the 8254 PIT. */
#include "kernel.h"
#include "x86.h"

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI 0x20
#define PIC_READ_ISR 0x0b
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_INPUT_HZ 1193182
#define PF_VECTOR 14

struct irq_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

volatile u64 timer_ticks;
volatile u64 stray_interrupts;
volatile u64 last_fault_addr;
extern char probe_read_insn[], probe_read_fixup[];

static const struct {
	u16 port;
	u8 val;
} pic_setup[] = {
	{ PIC1_CMD, 0x11 }, { PIC2_CMD, 0x11 }, /* ICW1: edge triggered, cascade, ICW4 follows */
	{ PIC1_DATA, IRQ_BASE }, { PIC2_DATA, IRQ_BASE + 8 }, /* ICW2: vectors 0x20-0x2f */
	{ PIC1_DATA, 0x04 }, { PIC2_DATA, 0x02 }, /* ICW3: slave on IRQ2 */
	{ PIC1_DATA, 0x01 }, { PIC2_DATA, 0x01 }, /* ICW4: 8086 mode */
	{ PIC1_DATA, 0xfa }, { PIC2_DATA, 0xff }, /* masks: only IRQ0 (timer) and the cascade */
};

void pic_init(void)
{
	for (size_t i = 0; i < ARRAY_SIZE(pic_setup); i++)
		outb(pic_setup[i].port, pic_setup[i].val);
}

static bool pic_in_service(unsigned irq)
{
	u16 port = irq < 8 ? PIC1_CMD : PIC2_CMD;
	outb(port, PIC_READ_ISR);
	return inb(port) & (1 << (irq & 7));
}

static void pic_eoi(unsigned irq)
{
	if (irq >= 8)
		outb(PIC2_CMD, PIC_EOI);
	outb(PIC1_CMD, PIC_EOI);
}

u32 pit_divisor(u32 hz)
{
	u32 d = (PIT_INPUT_HZ + hz / 2) / hz;
	return d < 2 ? 2 : d > 0xffff ? 0xffff : d;
}

void pit_set_hz(u32 hz)
{
	u32 d = pit_divisor(hz);
	outb(PIT_CMD, 0x34); /* channel 0, lo/hi byte, mode 2 (rate generator) */
	outb(PIT_CH0, d & 0xff);
	outb(PIT_CH0, d >> 8);
}

u16 pit_read_count(void)
{
	outb(PIT_CMD, 0x00); /* latch channel 0 */
	u8 lo = inb(PIT_CH0);
	u8 hi = inb(PIT_CH0);
	return (u16)(lo | hi << 8);
}

static void timer_irq(void)
{
	timer_ticks++;
}

static void (*const irq_handlers[16])(void) = {
	[0] = timer_irq,
};

static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
	"#NP", "#SS", "#GP", "#PF", "?",   "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
	"?",   "?",   "?",   "?",   "?",   "?",   "#HV", "#VC", "#SX", "?",
};

static void exception(struct irq_frame *f)
{
	if (f->vector == PF_VECTOR && f->rip == (u64)probe_read_insn) {
		last_fault_addr = read_cr2();
		f->rip = (u64)probe_read_fixup;
		return;
	}
	printk("EXCEPTION vector=%lu (%s) error=0x%lx rip=0x%lx cr2=0x%lx\n", f->vector,
	       exception_names[f->vector], f->error, f->rip, read_cr2());
	con_write("RESULT FAIL\n");
	machine_exit(false);
}

void interrupt_dispatch(struct irq_frame *f)
{
	if (f->vector < 32) {
		exception(f);
		return;
	}
	unsigned irq = (unsigned)(f->vector - IRQ_BASE);
	if (irq >= 16) {
		stray_interrupts++;
		return;
	}
	/* A spurious IRQ7/15 is not in service: no handler, and only the cascade gets an EOI. */
	if ((irq == 7 || irq == 15) && !pic_in_service(irq)) {
		if (irq == 15)
			pic_eoi(0);
		return;
	}
	if (irq_handlers[irq])
		irq_handlers[irq]();
	else
		stray_interrupts++;
	pic_eoi(irq);
}

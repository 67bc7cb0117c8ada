/* 8250 UART on COM1, polled (no UART interrupts), and the isa-debug-exit port. */
#include "kernel.h"
#include "format.h"
#include "x86.h"

#define COM1 0x3f8
#define UART_DATA 0
#define UART_IER 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_LSR_THRE 0x20
#define DEBUG_EXIT_PORT 0xf4

static const struct {
	u8 reg, val;
} uart_setup[] = {
	{ UART_IER, 0x00 }, /* polled: no UART interrupts */
	{ UART_LCR, 0x80 }, /* DLAB on: the next two registers are the divisor */
	{ UART_DATA, 0x01 }, /* divisor 1: 115200 baud */
	{ UART_IER, 0x00 },
	{ UART_LCR, 0x03 }, /* 8N1, DLAB off */
	{ UART_FCR, 0xc7 }, /* FIFOs on and cleared */
	{ UART_MCR, 0x03 }, /* DTR | RTS */
};

void uart_init(void)
{
	for (size_t i = 0; i < ARRAY_SIZE(uart_setup); i++)
		outb(COM1 + uart_setup[i].reg, uart_setup[i].val);
}

void con_putc(char c)
{
	while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE))
		;
	outb(COM1 + UART_DATA, (u8)c);
}

void con_write(const char *s)
{
	while (*s)
		con_putc(*s++);
}

static void uart_emit(struct sink *s, char c)
{
	(void)s;
	con_putc(c);
}

void printk(const char *fmt, ...)
{
	struct sink s = { uart_emit };
	va_list ap;
	va_start(ap, fmt);
	vformat(&s, fmt, ap);
	va_end(ap);
}

void machine_exit(bool pass)
{
	/* isa-debug-exit turns value v into QEMU exit status (v << 1) | 1: 1 = PASS, 3 = FAIL. */
	outb(DEBUG_EXIT_PORT, pass ? 0 : 1);
	for (;;) {
		cli();
		hlt();
	}
}

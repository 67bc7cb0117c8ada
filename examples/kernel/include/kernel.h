/* Interfaces shared by the kernel's C files. */
#ifndef KERNEL_H
#define KERNEL_H

#include "checksum.h"
#include "types.h"

/* Console (8250 UART on COM1, polled). */
void uart_init(void);
void con_putc(char c);
void con_write(const char *s);
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Exit through isa-debug-exit; halts forever when there is no such device. */
void __attribute__((noreturn)) machine_exit(bool pass);

/* Descriptor tables and interrupts. */
#define KERNEL_CS 0x10
#define KERNEL_DS 0x18
#define TSS_SEL 0x40
#define IRQ_BASE 0x20
void gdt_init(void);
void idt_init(void);
void pic_init(void);
void pit_set_hz(u32 hz);
u16 pit_read_count(void);
u32 pit_divisor(u32 hz);
extern volatile u64 timer_ticks;
extern volatile u64 stray_interrupts;

/* Reads *addr; returns false instead of faulting when the address is unmapped. */
bool probe_read(const volatile u64 *addr, u64 *val);
extern volatile u64 last_fault_addr;


/* libc-like helpers gcc may also call on its own. */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* Kernel command-line options (see README.md). */
struct options {
	const char *workloads;
	u64 repeat;
	u64 compute;
	u64 ticks;
	u64 hz;
	u64 console_lines;
	u64 irqflag_rounds;
};
extern struct options opt;

/* A workload returns NULL on success or a one-line reason for failure. */
typedef const char *(*workload_fn)(u64 *checksum);
const char *wl_pagetable(u64 *checksum);
const char *wl_irqflag(u64 *checksum);
const char *wl_timer(u64 *checksum);
const char *wl_cpuid_msr(u64 *checksum);
const char *wl_mmio(u64 *checksum);
const char *wl_console(u64 *checksum);
const char *wl_compute(u64 *checksum);
const char *wl_fault(u64 *checksum);

#endif

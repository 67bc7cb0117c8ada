/*
 * Register/flags-exact guest for the pvm backend's lean interrupt-flag entries
 * (tests/pvm.rs). A PVH kernel that, with known flags and GPRs, runs cli, sti, pushf and popf
 * (64-bit: the lean entries while native; 16-bit: the stub), ud2 into an interrupt-gate
 * handler (the backend's exception entry), sidt/sgdt, and page faults (CR2 and the error
 * code as the handler sees them), and prints every GPR and RFLAGS before and after
 * each ("D<case> ..." lines, whole RFLAGS: the kernel's view of IF must be
 * exact too) on COM1, then exits through isa-debug-exit. Built with the previrt toolchain
 * and linked with the runtime: under QEMU TCG with previrt.backend=native (the real
 * instructions) and under `previrt run --backend native` with previrt.backend=pvm it must
 * print the same lines.
 *
 * Flags are set without pushf/popf (those are the sites under test: pvm_tables.h's FLAGS);
 * the GPRs after that by movabs, which leaves the flags alone.
 */
#define CODE64 0x10
#include "dump.h"
#include "pvm_tables.h"

/* Every instruction under test with flag pattern \ah/\of/\df and IF on and off; cases from \base. */
.macro PATTERN base, ah, of, df, img
	FLAGS_CASE \base + 0, 0, \ah, \of, \df, cli
	FLAGS_CASE \base + 1, 1, \ah, \of, \df, cli
	FLAGS_CASE \base + 2, 0, \ah, \of, \df, sti
	FLAGS_CASE \base + 3, 1, \ah, \of, \df, sti
	FLAGS_CASE \base + 4, 0, \ah, \of, \df, pushfq; popq %rbx
	FLAGS_CASE \base + 5, 1, \ah, \of, \df, pushfq; popq %rbx
	FLAGS_CASE \base + 6, 0, \ah, \of, \df, pushq $\img; popfq
	FLAGS_CASE \base + 7, 1, \ah, \of, \df, pushq $\img; popfq
	FLAGS_CASE \base + 8, 0, \ah, \of, \df, pushq $\img | 0x200; popfq
	FLAGS_CASE \base + 9, 1, \ah, \of, \df, pushq $\img | 0x200; popfq
	FLAGS_CASE \base + 10, 1, \ah, \of, \df, pushfw; popw %bx
	FLAGS_CASE \base + 11, 0, \ah, \of, \df, pushw $(\img & 0xffff) | 0x200; popfw
	FLAGS_CASE \base + 12, 1, \ah, \of, \df, pushw $\img & 0xfdff; popfw
	FLAGS_CASE \base + 13, 0, \ah, \of, \df, ud2
	FLAGS_CASE \base + 14, 1, \ah, \of, \df, ud2
.endm

long_start:
	START
	GATE 6, ud_handler, 0x8e
	GATE 14, pf_dump, 0x8e

	/* sidt and sgdt show the kernel's tables (not a substitute the backend loaded). */
	FLAGS 0x00, 0, 0
	LOAD 0x3
	sidt table_buf
	movzwq table_buf, %rbx
	movq table_buf + 2, %rcx
	sgdt table_buf
	movzwq table_buf, %rsi
	movq table_buf + 2, %rdi
	DUMP 0x300

	PATTERN 0x10, 0xd5, 1, 1, 0x0cd7
	PATTERN 0x30, 0x00, 0, 0, 0x0002
	PATTERN 0x50, 0x41, 1, 0, 0x200843
	PATTERN 0x70, 0x94, 0, 1, 0x0496

	/* Page faults on the unmapped second GiB, in forms the pvm backend decodes the address
	 * of and forms it reads CR2 for (push, an access crossing into the unmapped page). No
	 * read-modify-write form: its error code differs between CPUs (QEMU TCG reports a read,
	 * this host's CPU a write). */
	FAULT 0x400, movq (%rdi), %rax
	FAULT 0x401, movl %esi, 8(%rdi)
	FAULT 0x402, movb $0x5a, 0x123(%rdi, %rcx, 4)
	FAULT 0x403, cmpq %rax, 0x10(%rdi)
	FAULT 0x404, movzbl 0x7ff(%rdi), %eax
	FAULT 0x405, movw $0x1234, 0x10(%rdi, %rcx, 8)
	FAULT 0x406, movq unmapped + 0x88(%rip), %rdx
	FAULT 0x407, pushq 0x20(%rdi)
	FAULT 0x408, movq -4(%rdi), %rax

	EXIT 0

/* #UD (interrupt gate): dump what the handler sees (IF clear, the interrupted flags
 * otherwise) with the frame's RFLAGS (less RF, which only faults may set) in rbx and its
 * CS and SS in rcx and rdx, then return past the ud2. */
ud_handler:
	movq 16(%rsp), %rbx
	andq $~0x10000, %rbx
	movq 8(%rsp), %rcx
	movq 32(%rsp), %rdx
	DUMP 0x200
	addq $2, (%rsp)
	iretq

	LINUX_GDT
	.data
table_buf:
	.skip 10

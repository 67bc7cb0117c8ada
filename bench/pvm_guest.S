/* A guest that meets KVM-PVM's native-mode rules by itself (docs/pvm.md): its own page
   tables with the root at GPA 0x3000 (CR3 bit 12 set) and U=1 at every level, its own GDT
   with the 0x33 DPL3 code segment and an IDT whose gates all point at 0x33, code at CS 0x10.
   It runs pvm_compute for N iterations (N = the decimal kernel command line), prints
   "mode=native|emulated result=R" on COM1 and exits through isa-debug-exit with 0.
   Entry: previrt's 64-bit ELF entry, %rdi = hvm_start_info. Any exception exits with 0x3e. */
.code64
.text
.globl _start
/* For a guest linked with another pvm_compute (bench/pvm_costs.S). */
.globl putc, puts, putdec, exit, idt
_start:
    mov 24(%rdi), %rsi              /* hvm_start_info.cmdline_paddr */
    xor %r12d, %r12d
1:  movzbl (%rsi), %eax
    sub $'0', %eax
    cmp $9, %eax
    ja 2f
    imul $10, %r12, %r12
    add %rax, %r12
    inc %rsi
    jmp 1b
2:  /* Identity map of the first GiB in 2 MiB pages: PML4 0x3000, PDPT 0x4000, PD 0x5000. */
    movq $0x4007, 0x3000
    movq $0x5007, 0x4000
    mov $0x5000, %edi
    mov $0x87, %eax                 /* P | RW | U | PS */
3:  mov %rax, (%rdi)
    add $0x200000, %rax
    add $8, %rdi
    cmp $0x6000, %edi
    jne 3b
    mov $0x3000, %eax
    mov %rax, %cr3
    lgdt gdtr(%rip)
    /* Every IDT gate: 64-bit interrupt gate, DPL 3, selector 0x33, target `fault`. */
    lea fault(%rip), %rax
    lea idt(%rip), %rdi
    mov $256, %ecx
4:  mov %ax, (%rdi)
    movw $0x33, 2(%rdi)
    movw $0xee00, 4(%rdi)
    mov %rax, %rdx
    shr $16, %rdx
    mov %dx, 6(%rdi)
    shr $16, %rdx
    mov %edx, 8(%rdi)
    movl $0, 12(%rdi)
    add $16, %rdi
    loop 4b
    lidt idtr(%rip)
    /* KVM-PVM's native mode shows the hardware selector (0x33, RPL 3) to `mov %cs`. */
    lea emulated(%rip), %rsi
    mov %cs, %eax
    test $3, %eax
    jz 5f
    lea native(%rip), %rsi
5:  call puts
    mov %r12, %rdi
    call pvm_compute
    call putdec
    mov $10, %al
    call putc
    xor %eax, %eax
    jmp exit
fault:
    mov $0x3e, %eax
exit:
    mov $0xf4, %dx
    out %eax, %dx
    hlt

putc:
    mov $0x3f8, %dx
    out %al, %dx
    ret
puts:
    lodsb
    test %al, %al
    jz 1f
    call putc
    jmp puts
1:  ret
/* Print %rax in decimal. */
putdec:
    lea digits_end(%rip), %rsi
    mov $10, %ecx
1:  xor %edx, %edx
    div %rcx
    add $'0', %dl
    dec %rsi
    mov %dl, (%rsi)
    test %rax, %rax
    jnz 1b
    jmp puts

.data
native:   .asciz "mode=native result="
emulated: .asciz "mode=emulated result="
digits:   .fill 24, 1, 0
digits_end: .byte 0
.balign 16
/* 0x08 code32, 0x10 code64, 0x18 data, 0x28 user data (0x2b), 0x30 user code64 (0x33). */
gdt:  .quad 0, 0x00cf9b000000ffff, 0x00af9b000000ffff, 0x00cf93000000ffff
      .quad 0, 0x00cff3000000ffff, 0x00affb000000ffff
gdt_end:
gdtr: .word gdt_end - gdt - 1
      .quad gdt
idtr: .word 4095
      .quad idt
.balign 16
idt:  .fill 4096, 1, 0
.section .note.GNU-stack, "", @progbits

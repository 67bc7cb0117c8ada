/* The compute loop shared by the KVM-PVM test guest (pvm_guest.S) and the host-process
   baseline (pvm_host.c): a 64-bit LCG folded into a running xor, %rdi iterations, result in
   %rax. SysV ABI, no memory traffic, so guest and host run the same instructions. */
.text
.globl pvm_compute
pvm_compute:
    mov $0x2545f4914f6cdd1d, %rsi
    xor %eax, %eax
    mov $1, %edx
    test %rdi, %rdi
    jz 2f
1:  imul %rsi, %rdx
    add $0x7f4a7c15, %rdx
    xor %rdx, %rax
    dec %rdi
    jnz 1b
2:  ret
.section .note.GNU-stack, "", @progbits

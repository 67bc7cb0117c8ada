/* pvm_gdt.S with ring-0 descriptors at 0x28 and 0x30, the selectors KVM-PVM's native mode
 * runs on (tests/pvm_tables.rs). */
#define SLOTS_TAKEN
#include "pvm_gdt.S"

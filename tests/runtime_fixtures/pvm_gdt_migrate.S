/* pvm_gdt.S with a loop of sites to be migrated in (tests/pvm_tables.rs). */
#define MIGRATE
#include "pvm_gdt.S"

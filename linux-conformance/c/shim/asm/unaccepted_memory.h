/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#pragma once
#include <linux/efi.h>
/* The architecture hooks of the kernel's lazy acceptance, answered by the harness. */
void arch_accept_memory(phys_addr_t start, phys_addr_t end);
struct efi_unaccepted_memory *efi_get_unaccepted_table(void);

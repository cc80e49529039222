// SPDX-License-Identifier: Apache-2.0 OR MIT
/*
 * Reaches the kernel's static tdx_map_gpa() (arch/x86/coco/tdx/tdx.c): the file is included
 * here unmodified and only this wrapper is exported. Built with -ffunction-sections and linked
 * with --gc-sections, so the rest of tdx.c needs declarations only.
 */
#include "arch/x86/coco/tdx/tdx.c"

bool tdmem_linux_tdx_map_gpa(phys_addr_t start, phys_addr_t end, bool enc)
{
	return tdx_map_gpa(start, end, enc);
}

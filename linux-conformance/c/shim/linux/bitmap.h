/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#pragma once
#define __LINUX_BITMAP_H
#include <linux/bitops.h>
#include <linux/find.h>
static inline void bitmap_set(unsigned long *map, unsigned long start, unsigned long len)
{
	for (unsigned long i = start; i < start + len; i++)
		map[BIT_WORD(i)] |= BIT_MASK(i);
}
static inline void bitmap_clear(unsigned long *map, unsigned long start, unsigned long len)
{
	for (unsigned long i = start; i < start + len; i++)
		map[BIT_WORD(i)] &= ~BIT_MASK(i);
}

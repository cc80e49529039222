/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#pragma once
#include <linux/bits.h>
#define BIT_MASK(n) (1UL << ((n) % BITS_PER_LONG))
#define BIT_WORD(n) ((n) / BITS_PER_LONG)
#define BITS_TO_LONGS(n) DIV_ROUND_UP(n, BITS_PER_LONG)
#define BITMAP_FIRST_WORD_MASK(start) (~0UL << ((start) & (BITS_PER_LONG - 1)))
#define BITMAP_LAST_WORD_MASK(nbits) (~0UL >> (-(nbits) & (BITS_PER_LONG - 1)))
#define small_const_nbits(n) (__builtin_constant_p(n) && (n) <= BITS_PER_LONG && (n) > 0)
static inline unsigned long __ffs(unsigned long w) { return (unsigned long)__builtin_ctzl(w); }
static inline unsigned long __fls(unsigned long w) { return 63 - (unsigned long)__builtin_clzl(w); }
static inline unsigned long ffz(unsigned long w) { return __ffs(~w); }
static inline unsigned long hweight_long(unsigned long w) { return (unsigned long)__builtin_popcountl(w); }
#define swab(x) __builtin_bswap64(x)
static inline bool test_bit(unsigned long nr, const unsigned long *addr)
{
	return (addr[BIT_WORD(nr)] >> (nr % BITS_PER_LONG)) & 1;
}

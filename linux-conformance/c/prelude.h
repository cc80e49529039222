/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#ifndef TDMEM_PRELUDE_H
#define TDMEM_PRELUDE_H

#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <limits.h>
#include <string.h>
#include <stdio.h>
#include <errno.h>

#define __LITTLE_ENDIAN 1234
#define CONFIG_UNACCEPTED_MEMORY 1
#define CONFIG_X86_64 1
#define CONFIG_64BIT 1

/* Kconfig test macros (a config symbol is on when defined to 1). */
#define TDMEM_ARG_PLACEHOLDER_1 0,
#define tdmem_second(ignored, val, ...) val
#define tdmem_is_defined(x) tdmem_is_defined1(x)
#define tdmem_is_defined1(val) tdmem_is_defined2(TDMEM_ARG_PLACEHOLDER_##val)
#define tdmem_is_defined2(arg) tdmem_second(arg 1, 0, 0)
#define IS_ENABLED(option) tdmem_is_defined(option)
#define IS_BUILTIN(option) tdmem_is_defined(option)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef u8 __u8;
typedef u16 __u16;
typedef u32 __u32;
typedef u64 __u64;
typedef s8 __s8;
typedef s16 __s16;
typedef s32 __s32;
typedef s64 __s64;
typedef u64 __aligned_u64 __attribute__((aligned(8)));
typedef u16 __le16;
typedef u32 __le32;
typedef u64 __le64;
typedef u16 __be16;
typedef u32 __be32;
typedef u64 __be64;
typedef u16 efi_char16_t_unused;
typedef u64 phys_addr_t;
typedef u64 resource_size_t;
typedef unsigned short umode_t;
typedef s64 ktime_t;
typedef long long time64_t;
typedef struct { int counter; } atomic_t;
typedef struct { long counter; } atomic_long_t;
typedef struct { u8 b[16]; } guid_t;
typedef struct { int unused; } spinlock_t;

struct range { u64 start; u64 end; };
struct list_head { struct list_head *next, *prev; };
struct work_struct { int unused; };
struct completion { int unused; };
enum reboot_mode { REBOOT_UNDEFINED = -1, REBOOT_COLD = 0 };

#define BITS_PER_LONG 64
#define BITS_PER_BYTE 8
#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#define PAGE_MASK (~(PAGE_SIZE - 1))
#define PMD_SHIFT 21
#define PMD_SIZE (1UL << PMD_SHIFT)
#define PUD_SHIFT 30
#define PUD_SIZE (1UL << PUD_SHIFT)

#define asmlinkage
#define __init
#define __initdata
#define __initconst
#define __ro_after_init
#define __always_inline inline __attribute__((always_inline))
#define noinline __attribute__((noinline))
#define noinstr
#define __noreturn __attribute__((noreturn))
#define __printf(a, b) __attribute__((format(printf, a, b)))
#define __packed __attribute__((packed))
#define __aligned(x) __attribute__((aligned(x)))
#define __must_check
#define __maybe_unused __attribute__((unused))
#define __used __attribute__((used))
#define __weak __attribute__((weak))
#define __efiapi
#define __user
#define __iomem
#define __force
#define __rcu
#define __pure
#define __cold
#define __section(s)
#define __visible
#define __counted_by(m)
#define __nonstring
#define __attribute_const__ __attribute__((const))
#define __stringify_1(x) #x
#define __stringify(x) __stringify_1(x)
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define EXPORT_SYMBOL(s)
#define EXPORT_SYMBOL_GPL(s)
#define EXPORT_SYMBOL_NS_GPL(s, ns)
#define fallthrough __attribute__((fallthrough))
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
#define BUILD_BUG_ON(c) ((void)sizeof(char[1 - 2 * !!(c)]))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define KERN_SOH "\001"
#define KERN_ERR KERN_SOH "3"
#define KERN_WARNING KERN_SOH "4"
#define KERN_INFO KERN_SOH "6"
#define KERN_DEBUG KERN_SOH "7"

#define min(a, b) ({ __typeof__(a) _a = (a); __typeof__(b) _b = (b); _a < _b ? _a : _b; })
#define max(a, b) ({ __typeof__(a) _a = (a); __typeof__(b) _b = (b); _a > _b ? _a : _b; })
#define min_t(t, a, b) min((t)(a), (t)(b))
#define max_t(t, a, b) max((t)(a), (t)(b))
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
#define round_up(x, y) ((((x) - 1) | ((__typeof__(x))((y) - 1))) + 1)
#define round_down(x, y) ((x) & ~((__typeof__(x))((y) - 1)))
#define IS_ALIGNED(x, a) (((x) & ((__typeof__(x))(a) - 1)) == 0)
#define ALIGN(x, a) round_up(x, a)


#endif

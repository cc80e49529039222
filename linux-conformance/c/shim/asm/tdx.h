/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#pragma once
/* The guest-facing part is the kernel's own asm/shared/tdx.h; TDCALL itself is the harness's. */
#include <asm/shared/tdx.h>
bool tdx_accept_memory(phys_addr_t start, phys_addr_t end);

/* Declarations the rest of tdx.c needs to compile; none of it is linked (--gc-sections). */
struct pt_regs { unsigned long ax, bx, cx, dx, si, di, bp, sp, ip, flags; };
struct ve_info { u64 exit_reason, exit_qual, gla, gpa; u32 instr_len, instr_info; };
typedef struct { u64 pte; } pte_t;
struct insn_field { long value; };
struct insn { struct insn_field immediate; int length; int opnd_bytes; };
enum insn_mode { INSN_MODE_64 = 64 };
enum insn_mmio_type {
	INSN_MMIO_DECODE_FAILED, INSN_MMIO_WRITE, INSN_MMIO_WRITE_IMM, INSN_MMIO_READ,
	INSN_MMIO_READ_ZERO_EXTEND, INSN_MMIO_READ_SIGN_EXTEND, INSN_MMIO_MOVS,
};
#define MAX_INSN_SIZE 15
#define __cpuidle
#define PAGE_OFFSET 0UL
enum cc_vendor { CC_VENDOR_NONE, CC_VENDOR_INTEL };
extern enum cc_vendor cc_vendor;
extern u64 physical_mask;
enum { X86_FEATURE_TSC_RELIABLE, X86_FEATURE_TDX_GUEST };
struct tdmem_guest_ops {
	void *enc_status_change_prepare, *enc_status_change_finish, *enc_cache_flush_required;
	void *enc_tlb_flush_required, *enc_kexec_begin, *enc_kexec_finish;
};
extern struct { struct tdmem_guest_ops guest; } x86_platform;
extern struct { bool parallel_bringup; } x86_cpuinit;
extern struct { struct { void *safe_halt, *halt; } irq; } pv_ops;
u64 cc_mkdec(u64 val);
#define instrumentation_begin() do { } while (0)
#define instrumentation_end() do { } while (0)

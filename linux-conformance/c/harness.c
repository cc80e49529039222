// SPDX-License-Identifier: Apache-2.0 OR MIT
/*
 * tdmem linux-conformance harness: the environment the compiled Linux files expect (EFI boot
 * services, TDCALL, the kernel's table pointer, panic), each answered by a Rust callback or by
 * a few lines here, plus entry points that run one Linux operation and report a panic as a
 * return value instead of ending the process.
 *
 * A panic in arch_accept_memory() is recorded and the call returns: unwinding out of the
 * kernel's accept_memory() would leave its on-stack entry in the global accepting_list. What
 * Linux would do after the panic is not compared. Other panics return to the entry point with
 * longjmp, through C frames only.
 *
 * Everything Linux-specific comes from the kernel's own headers at build time; this file only
 * uses the declarations.
 */
#include <linux/efi.h>
#include <asm/efi.h>
#include <asm/tdx.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdlib.h>
#include "drivers/firmware/efi/libstub/efistub.h"

/* Rust callbacks (linux-conformance/src/ffi.rs). */
u64 tdmem_rs_accept(u64 rcx);
u64 tdmem_rs_vmcall(u64 r11, u64 r12, u64 r13, u64 *r10_out, u64 *r11_out);
void tdmem_rs_arch_accept(u64 start, u64 end);
u64 tdmem_rs_shared_bit(void);

/* Defined by the compiled files. */
extern struct efi_unaccepted_memory *unaccepted_table;
efi_status_t allocate_unaccepted_bitmap(__u32 nr_desc, struct efi_boot_memmap *map);
void process_unaccepted_memory(u64 start, u64 end);
void tdmem_linux_kernel_accept_memory(phys_addr_t start, unsigned long size);
bool tdmem_linux_kernel_range_contains(phys_addr_t start, unsigned long size);
bool tdmem_linux_tdx_map_gpa(phys_addr_t start, phys_addr_t end, bool enc);

/* Where a Linux panic returns to: one per thread, set by every entry point. */
static __thread jmp_buf *panic_target;
static __thread char last_message[256];
/* A panic recorded without leaving the kernel code. */
static __thread int panicked;

static void tdmem_panic(const char *msg)
{
	snprintf(last_message, sizeof(last_message), "%s", msg);
	if (panic_target)
		longjmp(*panic_target, 1);
	abort();
}

const char *tdmem_linux_last_message(void)
{
	return last_message;
}

int efi_printk(const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(last_message, sizeof(last_message), fmt, ap);
	va_end(ap);
	return n;
}

/* ---- TDX: TDCALL and the shared bit ---- */

u64 __tdcall(u64 fn, struct tdx_module_args *args)
{
	if (fn != TDG_MEM_PAGE_ACCEPT)
		tdmem_panic("unexpected TDCALL leaf");
	return tdmem_rs_accept(args->rcx);
}

u64 __tdcall_saved_ret(u64 fn, struct tdx_module_args *args)
{
	if (fn != TDG_VP_VMCALL)
		tdmem_panic("unexpected TDCALL leaf");
	return tdmem_rs_vmcall(args->r11, args->r12, args->r13, &args->r10, &args->r11);
}

/* The kernel's panic(): tdx.c's __tdx_hypercall_failed() ends here. */
void panic(const char *fmt, ...)
{
	tdmem_panic(fmt);
}

u64 cc_mkdec(u64 val)
{
	return val | tdmem_rs_shared_bit();
}

void arch_accept_memory(phys_addr_t start, phys_addr_t end)
{
	tdmem_rs_arch_accept(start, end);
	if (!tdx_accept_memory(start, end) && !panicked) {
		panicked = 1;
		snprintf(last_message, sizeof(last_message), "TDX: Failed to accept memory");
	}
}

/* ---- Spin lock used by the kernel's lazy acceptance ---- */

void tdmem_lock(int *word)
{
	while (__atomic_exchange_n(word, 1, __ATOMIC_ACQUIRE))
		__builtin_ia32_pause();
}

void tdmem_unlock(int *word)
{
	__atomic_store_n(word, 0, __ATOMIC_RELEASE);
}

/* ---- The kernel's view of the table ---- */

static struct efi_unaccepted_memory *kernel_table;

struct efi_unaccepted_memory *efi_get_unaccepted_table(void)
{
	return kernel_table;
}

void tdmem_linux_set_kernel_table(void *table)
{
	kernel_table = table;
}

/* ---- EFI boot services for the stub ---- */

static void *installed_table;

void *get_efi_config_table(efi_guid_t guid)
{
	efi_guid_t want = LINUX_EFI_UNACCEPTED_MEM_TABLE_GUID;

	return efi_guidcmp(guid, want) ? NULL : installed_table;
}

static efi_status_t __efiapi pool_alloc(int type, unsigned long size, void **out)
{
	(void)type;
	*out = calloc(1, size);
	return *out ? EFI_SUCCESS : EFI_OUT_OF_RESOURCES;
}

static efi_status_t __efiapi pool_free(void *p)
{
	free(p);
	return EFI_SUCCESS;
}

static efi_status_t __efiapi install_table(efi_guid_t *guid, void *table)
{
	(void)guid;
	installed_table = table;
	return EFI_SUCCESS;
}

static efi_boot_services_t boot_services;
static efi_system_table_t system_table;
const efi_system_table_t *efi_system_table = &system_table;

/*
 * Runs the stub's part of setup_e820() (drivers/firmware/efi/libstub/x86-stub.c) on a memory
 * map: allocate_unaccepted_bitmap(), then process_unaccepted_memory() on every
 * EfiUnacceptedMemory descriptor. `firmware_table`, when not NULL, is the table the firmware
 * installed. Returns 0 and the table the kernel gets in *table_out, or -1 on a panic or an
 * EFI error (message in tdmem_linux_last_message()).
 */
int tdmem_linux_stub_setup(const u64 *descs, u32 nr_desc, void *firmware_table,
			   void **table_out)
{
	jmp_buf env;
	struct efi_boot_memmap *map;
	efi_status_t status;
	u32 i;

	boot_services.allocate_pool = pool_alloc;
	boot_services.free_pool = pool_free;
	boot_services.install_configuration_table = install_table;
	system_table.boottime = &boot_services;
	installed_table = firmware_table;
	unaccepted_table = NULL;
	last_message[0] = 0;
	panicked = 0;

	map = calloc(1, sizeof(*map) + nr_desc * sizeof(efi_memory_desc_t));
	if (!map)
		return -1;
	map->desc_size = sizeof(efi_memory_desc_t);
	map->map_size = nr_desc * sizeof(efi_memory_desc_t);
	for (i = 0; i < nr_desc; i++) {
		map->map[i].type = (u32)descs[3 * i];
		map->map[i].phys_addr = descs[3 * i + 1];
		map->map[i].num_pages = descs[3 * i + 2];
	}
	panic_target = &env;
	if (setjmp(env)) {
		panic_target = NULL;
		free(map);
		return -1;
	}
	status = allocate_unaccepted_bitmap(nr_desc, map);
	if (status != EFI_SUCCESS) {
		panic_target = NULL;
		free(map);
		return -1;
	}
	for (i = 0; i < nr_desc; i++) {
		efi_memory_desc_t *d = &map->map[i];

		if (d->type != EFI_UNACCEPTED_MEMORY)
			continue;
		process_unaccepted_memory(d->phys_addr, d->phys_addr + d->num_pages * PAGE_SIZE);
	}
	panic_target = NULL;
	free(map);
	*table_out = unaccepted_table;
	return panicked ? -1 : 0;
}

/* Frees a table the stub allocated (not one the firmware installed). */
void tdmem_linux_free(void *p)
{
	free(p);
}

/* The kernel's accept_memory(); -1 when it panicked. */
int tdmem_linux_accept_memory(u64 start, u64 size)
{
	jmp_buf env;

	panic_target = &env;
	if (setjmp(env)) {
		panic_target = NULL;
		return -1;
	}
	panicked = 0;
	tdmem_linux_kernel_accept_memory(start, size);
	panic_target = NULL;
	return panicked ? -1 : 0;
}

int tdmem_linux_range_contains_unaccepted(u64 start, u64 size)
{
	return tdmem_linux_kernel_range_contains(start, size);
}

/* tdx_accept_memory(); 1 true, 0 false. */
int tdmem_linux_tdx_accept_memory(u64 start, u64 end)
{
	return tdx_accept_memory(start, end);
}

/* tdx_map_gpa(); 1 true, 0 false, -1 panic. */
int tdmem_linux_map_gpa(u64 start, u64 end, int enc)
{
	jmp_buf env;
	int ok;

	panic_target = &env;
	if (setjmp(env)) {
		panic_target = NULL;
		return -1;
	}
	ok = tdmem_linux_tdx_map_gpa(start, end, enc != 0);
	panic_target = NULL;
	return ok;
}

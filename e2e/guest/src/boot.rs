//! Entry code: the PVH note and 32-bit entry (QEMU `-kernel`), the switch to long mode, the
//! 64-bit td-shim payload entry, and the exception stubs the IDT points at.
//!
//! PVH (`XEN_ELFNOTE_PHYS32_ENTRY`, note type 18): QEMU's loader puts the ELF at its physical
//! addresses and jumps to the note's address in 32-bit protected mode, paging off, flat
//! segments, EBX = `hvm_start_info`. The entry zeroes .bss, identity-maps the first 1 GiB with
//! 2M pages (and the local APIC's page, uncached), enables PAE and EFER.LME, turns paging on, loads a GDT with a 64-bit code segment
//! and far-jumps to 64-bit code, which sets the stack and calls `rust_start`.
//!
//! td-shim's executable payload entry (`_payload_start`, the ELF entry point) is already in long
//! mode with td-shim's identity map: it only switches to the image's stack and calls
//! `payload_start(hob, payload_base)`.
//!
//! Exception stubs: vectors 0-31 push a zero error code where the CPU pushes none, then the
//! vector, save the 15 general registers and call `exception_dispatch(&mut Frame)`; on return
//! they restore everything and `iretq`. Stack alignment: the CPU aligns RSP to 16 before pushing
//! its 5-word frame; error code + vector + 15 registers make the total 22 words, so RSP is
//! 16-byte aligned at the call, as the SysV ABI requires.

#[cfg(not(feature = "tdx"))]
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .p2align 2
    .long _start32
    .p2align 2

    /* From 32-bit protected mode, paging off: PAE, the image's page tables, EFER.LME,
       paging on, the 64-bit GDT, and a far jump to \target in long mode. */
.macro LONG_MODE target
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $\target
.endm
.macro DATA_SEGMENTS
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
.endm

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %ebx, %esi
    /* zero .bss (page tables, stacks, IDT live there) */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    /* PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 x 2 MiB identity */
    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $3, %eax
    mov %eax, boot_pdpt
    xor %ecx, %ecx
1:
    mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, boot_pd(,%ecx,8)
    movl $0, boot_pd+4(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 1b
    /* PDPT[3] -> a PD with one 2 MiB uncached page: the local APIC at 0xFEE00000 */
    mov $boot_pd_apic, %eax
    or $3, %eax
    mov %eax, boot_pdpt+24
    movl $0xFEE0009B, boot_pd_apic+0x1F7*8
    LONG_MODE start64

    .code64
start64:
    DATA_SEGMENTS
    lea boot_stack_top(%rip), %rsp
    mov %rsi, %rdi
    call rust_start
2:
    hlt
    jmp 2b


    /* Application processors: INIT-SIPI-SIPI starts them in real mode at the trampoline,
       copied to AP_TRAMPOLINE (below 1 MiB); it loads a 32-bit GDT, enters protected mode
       and jumps to ap_start32 here, at the image's link address. */
    .equ AP_TRAMPOLINE, 0x8000
    .code16
    .global ap_trampoline
ap_trampoline:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl ap_gdtr - ap_trampoline + AP_TRAMPOLINE
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_start32
    .p2align 3
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
ap_gdtr:
    .word 23
    .long ap_gdt - ap_trampoline + AP_TRAMPOLINE
    .global ap_trampoline_end
ap_trampoline_end:

    .code32
ap_start32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    LONG_MODE ap_start64

    .code64
ap_start64:
    DATA_SEGMENTS
    /* a stack per AP, in arrival order: ap_stacks + (n + 1) * 64 KiB; APs past the image's
       MAX_CPUS - 1 = 3 stacks park at once */
    mov $1, %eax
    lock xadd %eax, ap_arrivals(%rip)
    cmp $3, %eax
    jae 4f
    mov %eax, %edi
    inc %eax
    shl $16, %rax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call ap_rust_start
4:
    cli
    hlt
    jmp 4b

    .section .data
    .p2align 2
ap_arrivals:
    .long 0
gdt_ptr:
    .word gdt64_end - gdt64 - 1
    .long gdt64
    .long 0
"#,
    options(att_syntax)
);

// The payload entry, the GDT, stacks and exception stubs (both builds; position independent
// apart from the stub table, which a PIE build gets as relative relocations).
core::arch::global_asm!(
    r#"
    .section .text
    .global _payload_start
_payload_start:
    cli
    cld
    lea boot_stack_top(%rip), %rsp
    call payload_start
3:
    hlt
    jmp 3b

    .section .data
    .p2align 4
    .global gdt64
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    /* a 64-bit TSS descriptor (two slots) per vCPU, filled by arch::install_idt */
    .fill 8, 8, 0
    .global gdt64_end
gdt64_end:

    .section .bss
    .p2align 12
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096
boot_pd_apic:
    .skip 4096
    .p2align 4
boot_stack:
    .skip 262144
boot_stack_top:
    .p2align 4
ap_stacks:
    .skip 3 * 65536

    .section .text
.macro STUB vec, err

isr\vec:
    .if \err == 0
    push $0
    .endif
    push $\vec
    jmp isr_common
.endm
    STUB 0, 0
    STUB 1, 0
    STUB 2, 0
    STUB 3, 0
    STUB 4, 0
    STUB 5, 0
    STUB 6, 0
    STUB 7, 0
    STUB 8, 1
    STUB 9, 0
    STUB 10, 1
    STUB 11, 1
    STUB 12, 1
    STUB 13, 1
    STUB 14, 1
    STUB 15, 0
    STUB 16, 0
    STUB 17, 1
    STUB 18, 0
    STUB 19, 0
    STUB 20, 0
    STUB 21, 1
    STUB 22, 0
    STUB 23, 0
    STUB 24, 0
    STUB 25, 0
    STUB 26, 0
    STUB 27, 0
    STUB 28, 0
    STUB 29, 1
    STUB 30, 1
    STUB 31, 0

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call exception_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .data
    .p2align 3
    .global isr_table
isr_table:
    .quad isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7
    .quad isr8, isr9, isr10, isr11, isr12, isr13, isr14, isr15
    .quad isr16, isr17, isr18, isr19, isr20, isr21, isr22, isr23
    .quad isr24, isr25, isr26, isr27, isr28, isr29, isr30, isr31
"#,
    options(att_syntax)
);

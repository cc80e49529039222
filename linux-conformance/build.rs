//! Builds the Linux files the conformance suite compares against, when `cargo xtask linux` says
//! where their source is (`TDMEM_LINUX_SRC`, a kernel tree holding at least the files below).
//! Without it nothing is built and the suite compiles to nothing, so a plain `cargo test
//! --workspace` needs no kernel source.
//!
//! The kernel files are compiled unmodified; `c/` holds this project's prelude, shim headers and
//! harness.

use std::env;
use std::path::PathBuf;

/// Kernel files compiled, with the `-D` renames that keep their symbols apart.
const KERNEL_FILES: &[(&str, &[(&str, &str)])] = &[
    (
        "drivers/firmware/efi/unaccepted_memory.c",
        &[
            ("accept_memory", "tdmem_linux_kernel_accept_memory"),
            (
                "range_contains_unaccepted_memory",
                "tdmem_linux_kernel_range_contains",
            ),
        ],
    ),
    (
        "drivers/firmware/efi/libstub/unaccepted_memory.c",
        &[("accept_memory", "tdmem_linux_stub_accept_memory")],
    ),
    ("arch/x86/coco/tdx/tdx-shared.c", &[]),
    ("lib/find_bit.c", &[]),
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(linux_code)");
    println!("cargo::rerun-if-env-changed=TDMEM_LINUX_SRC");
    println!("cargo::rerun-if-changed=c");
    let Some(src) = env::var_os("TDMEM_LINUX_SRC") else {
        return;
    };
    let ksrc = PathBuf::from(src);
    let here = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let c = here.join("c");
    for (file, _) in KERNEL_FILES {
        println!("cargo::rerun-if-changed={}", ksrc.join(file).display());
    }

    let base = || {
        let mut b = cc::Build::new();
        b.flag("-include")
            .flag(c.join("prelude.h").to_str().expect("UTF-8 path"))
            .include(c.join("shim"))
            .include(&ksrc)
            .flag(format!("-idirafter{}", ksrc.join("include").display()))
            .flag(format!(
                "-idirafter{}",
                ksrc.join("arch/x86/include").display()
            ))
            .flag("-fshort-wchar")
            .flag("-ffunction-sections")
            .flag("-fdata-sections")
            .flag("-fno-strict-aliasing")
            .flag("-w")
            .warnings(false)
            .opt_level(1);
        b
    };

    let mut objects = Vec::new();
    for (file, renames) in KERNEL_FILES {
        let mut b = base();
        for (from, to) in *renames {
            b.define(from, Some(*to));
        }
        b.file(ksrc.join(file));
        objects.extend(b.compile_intermediates());
    }
    let mut b = base();
    b.file(c.join("harness.c")).file(c.join("tdx_map_gpa.c"));
    objects.extend(b.compile_intermediates());

    let mut lib = cc::Build::new();
    lib.objects(objects);
    lib.compile("tdmem_linux");
    println!("cargo::rustc-cfg=linux_code");
}

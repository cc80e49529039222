//! The compiled Linux functions, and the callbacks through which their TDCALLs reach a module.
//!
//! One [`Session`] at a time owns the C side (the kernel code keeps its table and the stub's in
//! globals): [`Session::new`] takes a process-wide lock and installs the module every TDCALL of
//! the Linux code goes to; dropping it removes both. A Linux `panic()` (e.g. "TDX: Failed to
//! accept memory") comes back as [`LinuxPanic`] through the harness's `longjmp`, which only
//! crosses C frames.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use accept::abi::{vmcall, Gpa, PageLevel, StatusCode};
use accept::Tdcall;

/// The module the Linux code calls, shared with threads that run Linux code concurrently.
pub type SharedModule = Arc<Mutex<dyn Tdcall + Send>>;

extern "C" {
    fn tdmem_linux_stub_setup(
        descs: *const u64,
        nr_desc: u32,
        firmware_table: *mut c_void,
        table_out: *mut *mut c_void,
    ) -> c_int;
    fn tdmem_linux_free(p: *mut c_void);
    fn tdmem_linux_set_kernel_table(table: *mut c_void);
    fn tdmem_linux_accept_memory(start: u64, size: u64) -> c_int;
    fn tdmem_linux_range_contains_unaccepted(start: u64, size: u64) -> c_int;
    fn tdmem_linux_tdx_accept_memory(start: u64, end: u64) -> c_int;
    fn tdmem_linux_map_gpa(start: u64, end: u64, enc: c_int) -> c_int;
    fn tdmem_linux_last_message() -> *const c_char;
}

static SERIAL: Mutex<()> = Mutex::new(());
static MODULE: Mutex<Option<SharedModule>> = Mutex::new(None);
static ARCH_ACCEPTS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
static SHARED_BIT: Mutex<u64> = Mutex::new(1 << 47);

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn module() -> Option<SharedModule> {
    lock(&MODULE).clone()
}

/// `TDG.MEM.PAGE.ACCEPT` from Linux: RCX = GPA | level.
#[no_mangle]
extern "C" fn tdmem_rs_accept(rcx: u64) -> u64 {
    let Some(level) = PageLevel::from_index(rcx & 7) else {
        return StatusCode::OperandInvalid.with_operand(1).raw();
    };
    let gpa = Gpa::new_truncate(rcx & !0xFFF);
    match module() {
        Some(m) => lock(&*m).accept(gpa, level).raw(),
        None => StatusCode::OperandInvalid.with_operand(1).raw(),
    }
}

/// `TDG.VP.VMCALL` from Linux; only MapGPA is expected. Returns RAX, writes R10 and R11.
#[no_mangle]
extern "C" fn tdmem_rs_vmcall(
    r11: u64,
    r12: u64,
    r13: u64,
    r10_out: *mut u64,
    r11_out: *mut u64,
) -> u64 {
    let (status, resume) = match module() {
        Some(m) if r11 == vmcall::MAP_GPA => {
            let out = lock(&*m).map_gpa(r12, r13);
            if !out.tdcall.is_success() {
                return out.tdcall.raw();
            }
            (out.status.raw(), out.resume_gpa)
        }
        _ => (accept::abi::GhciStatus::SubfuncUnsupported.raw(), 0),
    };
    // SAFETY: the harness passes pointers to the R10 and R11 fields of a live
    // `struct tdx_module_args` on its stack.
    unsafe {
        *r10_out = status;
        *r11_out = resume;
    }
    0
}

/// Every `arch_accept_memory(start, end)` Linux makes, logged before the acceptance.
#[no_mangle]
extern "C" fn tdmem_rs_arch_accept(start: u64, end: u64) {
    lock(&ARCH_ACCEPTS).push((start, end));
}

/// `cc_mkdec(0)`: the shared bit.
#[no_mangle]
extern "C" fn tdmem_rs_shared_bit() -> u64 {
    *lock(&SHARED_BIT)
}

/// A Linux `panic()`, with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxPanic(pub String);

fn last_message() -> String {
    // SAFETY: the harness returns a pointer to its own NUL-terminated thread-local buffer.
    unsafe { CStr::from_ptr(tdmem_linux_last_message()) }
        .to_string_lossy()
        .into_owned()
}

/// An unaccepted table as Linux holds it: `struct efi_unaccepted_memory`, 8-byte aligned, with
/// the bitmap padded to whole `unsigned long`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTable {
    words: Vec<u64>,
    len: usize,
}

impl KernelTable {
    /// A copy of table bytes (header + bitmap).
    pub fn from_bytes(bytes: &[u8]) -> KernelTable {
        let mut words = vec![0u64; bytes.len().div_ceil(8) + 1];
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            words[i] = u64::from_le_bytes(w);
        }
        KernelTable {
            words,
            len: bytes.len(),
        }
    }

    /// The table bytes (header + bitmap).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len);
        out
    }

    fn as_mut_ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr().cast()
    }

    /// Reads a table a C pointer points at (header, then `size` bitmap bytes).
    ///
    /// # Safety
    /// `p` points at a valid `struct efi_unaccepted_memory` whose bitmap holds `size` bytes.
    unsafe fn read(p: *const c_void) -> KernelTable {
        // SAFETY: the caller guarantees a header of 24 bytes at `p`.
        let header = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 24) };
        let size = u64::from_le_bytes(header[16..24].try_into().unwrap_or([0; 8])) as usize;
        // SAFETY: the caller guarantees `size` bitmap bytes after the header.
        let all = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 24 + size) };
        KernelTable::from_bytes(all)
    }
}

/// What the EFI stub did with a memory map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StubOutcome {
    /// The table the kernel gets (the firmware's, updated, or the one the stub built).
    pub table: Option<KernelTable>,
    /// Every `arch_accept_memory` the stub made, in order.
    pub accepted: Vec<(u64, u64)>,
}

/// An EFI memory descriptor: (type, physical start, number of 4K pages).
pub type Descriptor = (u32, u64, u64);

/// `EfiConventionalMemory`.
pub const EFI_CONVENTIONAL_MEMORY: u32 = 7;
/// `EfiUnacceptedMemoryType`.
pub const EFI_UNACCEPTED_MEMORY: u32 = 15;

/// Exclusive use of the compiled Linux code.
#[derive(Debug)]
pub struct Session {
    _serial: MutexGuard<'static, ()>,
    kernel_table: Option<KernelTable>,
}

impl Session {
    /// Takes the Linux code for this caller and points its TDCALLs at `module`.
    pub fn new(module: SharedModule) -> Session {
        let serial = lock(&SERIAL);
        *lock(&MODULE) = Some(module);
        lock(&ARCH_ACCEPTS).clear();
        *lock(&SHARED_BIT) = 1 << 47;
        Session {
            _serial: serial,
            kernel_table: None,
        }
    }

    /// `arch_accept_memory` calls since the last call of this function.
    pub fn take_arch_accepts(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *lock(&ARCH_ACCEPTS))
    }

    /// The EFI stub's part of `setup_e820()`: `allocate_unaccepted_bitmap()` on `map`, then
    /// `process_unaccepted_memory()` on every EfiUnacceptedMemory descriptor. `firmware` is the
    /// table the firmware installed, if any.
    ///
    /// # Errors
    /// [`LinuxPanic`] when Linux panicked or the stub returned an EFI error.
    pub fn stub_setup(
        &mut self,
        map: &[Descriptor],
        firmware: Option<&[u8]>,
    ) -> Result<StubOutcome, LinuxPanic> {
        let flat: Vec<u64> = map
            .iter()
            .flat_map(|&(t, s, n)| [u64::from(t), s, n])
            .collect();
        let mut fw = firmware.map(KernelTable::from_bytes);
        let fw_ptr = fw
            .as_mut()
            .map_or(std::ptr::null_mut(), KernelTable::as_mut_ptr);
        let mut out: *mut c_void = std::ptr::null_mut();
        self.take_arch_accepts();
        let nr = u32::try_from(map.len()).unwrap_or(u32::MAX);
        // SAFETY: `flat` holds 3 * nr u64s; `fw_ptr` is NULL or a live, 8-aligned table with
        // its bitmap padded; `out` is a valid place for the result.
        let rc = unsafe { tdmem_linux_stub_setup(flat.as_ptr(), nr, fw_ptr, &mut out) };
        let accepted = self.take_arch_accepts();
        if rc != 0 {
            return Err(LinuxPanic(last_message()));
        }
        let table = if out.is_null() {
            None
        } else if out == fw_ptr {
            fw
        } else {
            // SAFETY: the stub allocated this table with its header and `size` bitmap bytes.
            let t = unsafe { KernelTable::read(out) };
            // SAFETY: allocated by the harness's allocate_pool (calloc), not used after this.
            unsafe { tdmem_linux_free(out) };
            Some(t)
        };
        Ok(StubOutcome { table, accepted })
    }

    /// Hands `table` to the kernel's lazy acceptance (what `efi.unaccepted` points at).
    pub fn set_kernel_table(&mut self, table: Option<&[u8]>) {
        self.kernel_table = table.map(KernelTable::from_bytes);
        let p = self
            .kernel_table
            .as_mut()
            .map_or(std::ptr::null_mut(), KernelTable::as_mut_ptr);
        // SAFETY: `p` is NULL or points at the table this session owns until it is replaced
        // or the session ends (both reset the pointer first).
        unsafe { tdmem_linux_set_kernel_table(p) };
    }

    /// The kernel's table now (its bits cleared by acceptance).
    pub fn kernel_table(&self) -> Option<Vec<u8>> {
        self.kernel_table.as_ref().map(KernelTable::bytes)
    }

    /// The kernel's `accept_memory(start, size)`.
    ///
    /// # Errors
    /// [`LinuxPanic`] when it panicked.
    pub fn accept_memory(&self, start: u64, size: u64) -> Result<(), LinuxPanic> {
        accept_memory(start, size)
    }

    /// The kernel's `range_contains_unaccepted_memory(start, size)`.
    pub fn range_contains_unaccepted(&self, start: u64, size: u64) -> bool {
        // SAFETY: plain values; the kernel table pointer is valid (see `set_kernel_table`).
        unsafe { tdmem_linux_range_contains_unaccepted(start, size) != 0 }
    }

    /// `tdx_accept_memory(start, end)`.
    pub fn tdx_accept_memory(&self, start: u64, end: u64) -> bool {
        // SAFETY: plain values.
        unsafe { tdmem_linux_tdx_accept_memory(start, end) != 0 }
    }

    /// `tdx_map_gpa(start, end, enc)` (`enc` true: to private).
    ///
    /// # Errors
    /// [`LinuxPanic`] when it panicked (a failed TDCALL).
    pub fn tdx_map_gpa(&self, start: u64, end: u64, enc: bool) -> Result<bool, LinuxPanic> {
        // SAFETY: plain values.
        match unsafe { tdmem_linux_map_gpa(start, end, c_int::from(enc)) } {
            -1 => Err(LinuxPanic(last_message())),
            rc => Ok(rc == 1),
        }
    }

    /// A handle other threads use to call the kernel's lazy acceptance while this session
    /// lives (the kernel code takes its own lock).
    pub fn concurrent(&self) -> Concurrent<'_> {
        Concurrent { _session: self }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: clearing the pointer before the table it points at is dropped.
        unsafe { tdmem_linux_set_kernel_table(std::ptr::null_mut()) };
        *lock(&MODULE) = None;
    }
}

/// The kernel's lazy acceptance, callable from several threads of one [`Session`]: the kernel
/// code serializes its bitmap with its own spin lock, the harness's panic state is
/// thread-local, and the module behind the callbacks is behind a mutex.
#[derive(Debug, Clone, Copy)]
pub struct Concurrent<'s> {
    _session: &'s Session,
}

impl Concurrent<'_> {
    /// The kernel's `accept_memory(start, size)` on this thread.
    ///
    /// # Errors
    /// [`LinuxPanic`] when it panicked.
    pub fn accept_memory(&self, start: u64, size: u64) -> Result<(), LinuxPanic> {
        accept_memory(start, size)
    }
}

fn accept_memory(start: u64, size: u64) -> Result<(), LinuxPanic> {
    // SAFETY: plain values; the kernel table pointer is valid while the session lives.
    match unsafe { tdmem_linux_accept_memory(start, size) } {
        0 => Ok(()),
        _ => Err(LinuxPanic(last_message())),
    }
}

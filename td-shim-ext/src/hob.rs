//! A bounded walk over a TD HOB list (UEFI PI volume 3, chapter 5), with the structure layouts of
//! the published `td-shim-interface` crate (`td_uefi_pi::pi::hob`).
//!
//! The HOB list comes from the host-controlled TD build (TDVF / td-shim's TD HOB), so it is
//! untrusted input: every header is bounds-checked, lengths must be at least the generic header
//! and keep the walk 8-byte aligned inside the buffer, and the list must start with the
//! hand-off table (PHIT) and end with an END_OF_HOB_LIST header. Nothing here panics on a bad
//! list; the first problem is returned with its byte offset.
//!
//! Only resource-descriptor HOBs are decoded ([`HobResources`]); other HOB types are skipped.
//! The walk does not check `EfiEndOfHobList` of the PHIT against buffer addresses (td-shim's
//! `check_hob_length` does, with pointers): the caller passes the slice it trusts.

use core::fmt;
use core::mem::size_of;

use scroll::Pread;
use td_shim_interface::td_uefi_pi::pi::hob::{
    Header, ResourceDescription, HOB_TYPE_END_OF_HOB_LIST, HOB_TYPE_HANDOFF,
    HOB_TYPE_RESOURCE_DESCRIPTOR, RESOURCE_MEMORY_UNACCEPTED, RESOURCE_SYSTEM_MEMORY,
};
use tdmem_accept::abi::{AddrError, GpaRange};

/// Generic HOB header length.
pub const HEADER_LEN: usize = size_of::<Header>();
/// Resource-descriptor HOB length (header, owner GUID, type, attributes, start, length).
pub const RESOURCE_HOB_LEN: usize = size_of::<ResourceDescription>();

/// What is wrong with a HOB list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HobError {
    /// A header or a HOB body runs past the end of the buffer.
    Truncated {
        /// Byte offset of the HOB.
        offset: usize,
    },
    /// A HOB length shorter than its type needs (or than the generic header).
    BadLength {
        /// Byte offset of the HOB.
        offset: usize,
        /// The length field.
        length: u16,
    },
    /// The first HOB is not the hand-off information table.
    NoHandoff,
    /// The buffer ended before an END_OF_HOB_LIST header.
    NoEnd,
    /// A resource descriptor whose range overflows or passes 2^52.
    BadRange {
        /// Byte offset of the HOB.
        offset: usize,
        /// Why.
        error: AddrError,
    },
}

impl fmt::Display for HobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HobError::Truncated { offset } => write!(f, "HOB at {offset:#x} runs past the list"),
            HobError::BadLength { offset, length } => {
                write!(f, "HOB at {offset:#x} has a bad length {length}")
            }
            HobError::NoHandoff => f.write_str("HOB list does not start with a PHIT"),
            HobError::NoEnd => f.write_str("HOB list has no END_OF_HOB_LIST"),
            HobError::BadRange { offset, error } => {
                write!(f, "resource HOB at {offset:#x}: {error:?}")
            }
        }
    }
}

/// The kind of a memory resource descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// `EFI_RESOURCE_SYSTEM_MEMORY` (0): memory the TD build added (TDH.MEM.PAGE.ADD), already
    /// accepted.
    SystemMemory,
    /// `EFI_RESOURCE_MEMORY_UNACCEPTED` (7): private memory still to be accepted.
    Unaccepted,
    /// Any other resource type (MMIO, I/O, reserved, ...), raw.
    Other(u32),
}

impl ResourceKind {
    /// Decodes the `ResourceType` field.
    pub const fn from_raw(raw: u32) -> ResourceKind {
        match raw {
            RESOURCE_SYSTEM_MEMORY => ResourceKind::SystemMemory,
            RESOURCE_MEMORY_UNACCEPTED => ResourceKind::Unaccepted,
            other => ResourceKind::Other(other),
        }
    }
}

/// One resource-descriptor HOB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    /// Its type.
    pub kind: ResourceKind,
    /// `ResourceAttribute`.
    pub attributes: u32,
    /// `[PhysicalStart, PhysicalStart + ResourceLength)`.
    pub range: GpaRange,
}

/// Iterator over the resource descriptors of a HOB list. Yields `Err` once, at the first
/// malformed HOB, then stops. A zero-length resource is skipped.
#[derive(Debug, Clone)]
pub struct HobResources<'a> {
    list: &'a [u8],
    offset: usize,
    done: bool,
}

/// Walks `list` and yields its resource descriptors.
///
/// # Errors
/// [`HobError::NoHandoff`] when the list does not start with a PHIT (checked at once); later
/// problems come out of the iterator.
pub fn resources(list: &[u8]) -> Result<HobResources<'_>, HobError> {
    let header: Header = list
        .pread_with(0, scroll::LE)
        .map_err(|_| HobError::NoHandoff)?;
    if header.r#type != HOB_TYPE_HANDOFF {
        return Err(HobError::NoHandoff);
    }
    Ok(HobResources {
        list,
        offset: 0,
        done: false,
    })
}

impl HobResources<'_> {
    fn step(&mut self) -> Result<Option<Resource>, HobError> {
        loop {
            let offset = self.offset;
            let header: Header = self
                .list
                .pread_with(offset, scroll::LE)
                .map_err(|_| HobError::NoEnd)?;
            if header.r#type == HOB_TYPE_END_OF_HOB_LIST {
                return Ok(None);
            }
            let length = header.length;
            if usize::from(length) < HEADER_LEN {
                return Err(HobError::BadLength { offset, length });
            }
            // HOBs are 8-byte aligned: the next one starts at the length rounded up.
            let next = offset
                .checked_add(usize::from(length).next_multiple_of(8))
                .ok_or(HobError::Truncated { offset })?;
            if offset + usize::from(length) > self.list.len() {
                return Err(HobError::Truncated { offset });
            }
            self.offset = next;
            if header.r#type != HOB_TYPE_RESOURCE_DESCRIPTOR {
                continue;
            }
            if usize::from(length) < RESOURCE_HOB_LEN {
                return Err(HobError::BadLength { offset, length });
            }
            let hob: ResourceDescription = self
                .list
                .pread_with(offset, scroll::LE)
                .map_err(|_| HobError::Truncated { offset })?;
            if hob.resource_length == 0 {
                continue;
            }
            let range = GpaRange::from_len(hob.physical_start, hob.resource_length)
                .map_err(|error| HobError::BadRange { offset, error })?;
            return Ok(Some(Resource {
                kind: ResourceKind::from_raw(hob.resource_type),
                attributes: hob.resource_attribute,
                range,
            }));
        }
    }
}

impl Iterator for HobResources<'_> {
    type Item = Result<Resource, HobError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Builders for HOB lists, for tests and for payloads that hand a HOB list on.
pub mod build {
    use scroll::Pwrite;
    use td_shim_interface::td_uefi_pi::pi::hob::{
        HandoffInfoTable, Header, ResourceDescription, HOB_TYPE_END_OF_HOB_LIST, HOB_TYPE_HANDOFF,
        HOB_TYPE_RESOURCE_DESCRIPTOR,
    };

    /// Writes HOBs one after another into a caller buffer. Methods return `None` when the buffer
    /// is full.
    #[derive(Debug)]
    pub struct HobWriter<'b> {
        buf: &'b mut [u8],
        at: usize,
    }

    impl<'b> HobWriter<'b> {
        /// A writer that starts with a PHIT (boot mode 0, memory fields zero).
        pub fn new(buf: &'b mut [u8]) -> Option<HobWriter<'b>> {
            let phit = HandoffInfoTable {
                header: Header {
                    r#type: HOB_TYPE_HANDOFF,
                    length: core::mem::size_of::<HandoffInfoTable>() as u16,
                    reserved: 0,
                },
                version: 9,
                boot_mode: 0,
                efi_memory_top: 0,
                efi_memory_bottom: 0,
                efi_free_memory_top: 0,
                efi_free_memory_bottom: 0,
                efi_end_of_hob_list: 0,
            };
            let at = buf.pwrite_with(phit, 0, scroll::LE).ok()?;
            Some(HobWriter { buf, at })
        }

        /// Appends a resource descriptor.
        pub fn resource(&mut self, kind: u32, attributes: u32, start: u64, len: u64) -> Option<()> {
            let hob = ResourceDescription {
                header: Header {
                    r#type: HOB_TYPE_RESOURCE_DESCRIPTOR,
                    length: super::RESOURCE_HOB_LEN as u16,
                    reserved: 0,
                },
                owner: [0; 16],
                resource_type: kind,
                resource_attribute: attributes,
                physical_start: start,
                resource_length: len,
            };
            self.at += self.buf.pwrite_with(hob, self.at, scroll::LE).ok()?;
            Some(())
        }

        /// Appends an arbitrary HOB of `length` bytes (header included, body zero).
        pub fn raw(&mut self, r#type: u16, length: u16) -> Option<()> {
            let header = Header {
                r#type,
                length,
                reserved: 0,
            };
            let end = self
                .at
                .checked_add(usize::from(length).next_multiple_of(8))?;
            self.buf.get_mut(self.at..end)?.fill(0);
            self.buf.pwrite_with(header, self.at, scroll::LE).ok()?;
            self.at = end;
            Some(())
        }

        /// Appends END_OF_HOB_LIST and returns the list length.
        pub fn finish(mut self) -> Option<usize> {
            let end = Header {
                r#type: HOB_TYPE_END_OF_HOB_LIST,
                length: 8,
                reserved: 0,
            };
            self.at += self.buf.pwrite_with(end, self.at, scroll::LE).ok()?;
            Some(self.at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::HobWriter;
    use super::*;
    use td_shim_interface::td_uefi_pi::pi::hob::{HOB_TYPE_CPU, RESOURCE_MEMORY_MAPPED_IO};

    const M: u64 = 1 << 20;

    #[test]
    fn layouts_match_the_pi_spec() {
        assert_eq!(HEADER_LEN, 8);
        assert_eq!(RESOURCE_HOB_LEN, 48);
    }

    #[test]
    fn walks_resources_and_skips_other_hobs() {
        let mut buf = [0u8; 512];
        let mut w = HobWriter::new(&mut buf).unwrap();
        w.resource(RESOURCE_SYSTEM_MEMORY, 7, 0, 2 * M).unwrap();
        w.raw(HOB_TYPE_CPU, 14).unwrap(); // odd length: next HOB 8-aligned
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 7, 2 * M, 100 * M)
            .unwrap();
        w.resource(RESOURCE_MEMORY_MAPPED_IO, 1, 0xFEC0_0000, 4096)
            .unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 7, 8 * M, 0).unwrap();
        let len = w.finish().unwrap();
        let got: [Resource; 3] = {
            let mut it = resources(&buf[..len]).unwrap();
            let a = it.next().unwrap().unwrap();
            let b = it.next().unwrap().unwrap();
            let c = it.next().unwrap().unwrap();
            assert!(it.next().is_none());
            [a, b, c]
        };
        assert_eq!(got[0].kind, ResourceKind::SystemMemory);
        assert_eq!(got[0].range, GpaRange::new(0, 2 * M).unwrap());
        assert_eq!(got[1].kind, ResourceKind::Unaccepted);
        assert_eq!(got[1].range, GpaRange::new(2 * M, 102 * M).unwrap());
        assert_eq!(got[2].kind, ResourceKind::Other(RESOURCE_MEMORY_MAPPED_IO));
    }

    #[test]
    fn rejects_lists_without_phit() {
        let buf = [0xFFu8; 16];
        assert_eq!(resources(&buf).err(), Some(HobError::NoHandoff));
        assert_eq!(resources(&[]).err(), Some(HobError::NoHandoff));
    }

    #[test]
    fn missing_end_and_truncation_are_errors_not_panics() {
        let mut buf = [0u8; 256];
        let mut w = HobWriter::new(&mut buf).unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 0, 0, 4 * M).unwrap();
        let len = w.finish().unwrap();
        // Cut the END header off.
        let mut it = resources(&buf[..len - 8]).unwrap();
        assert!(it.next().unwrap().is_ok());
        assert_eq!(it.next(), Some(Err(HobError::NoEnd)));
        assert_eq!(it.next(), None);
        // Cut into the resource HOB.
        let mut it = resources(&buf[..len - 20]).unwrap();
        assert!(matches!(it.next(), Some(Err(HobError::Truncated { .. }))));
    }

    #[test]
    fn bad_lengths_and_ranges_are_reported() {
        let mut buf = [0u8; 256];
        let mut w = HobWriter::new(&mut buf).unwrap();
        w.raw(HOB_TYPE_RESOURCE_DESCRIPTOR, 16).unwrap();
        let len = w.finish().unwrap();
        let mut it = resources(&buf[..len]).unwrap();
        assert!(matches!(
            it.next(),
            Some(Err(HobError::BadLength { length: 16, .. }))
        ));

        let mut buf = [0u8; 256];
        let w = HobWriter::new(&mut buf).unwrap();
        let len = w.finish().unwrap();
        // Turn the END header into a CPU HOB of length 0.
        buf[len - 8..len - 4].copy_from_slice(&[HOB_TYPE_CPU as u8, 0, 0, 0]);
        let mut it = resources(&buf[..len]).unwrap();
        assert!(matches!(
            it.next(),
            Some(Err(HobError::BadLength { length: 0, .. }))
        ));

        let mut buf = [0u8; 256];
        let mut w = HobWriter::new(&mut buf).unwrap();
        w.resource(RESOURCE_MEMORY_UNACCEPTED, 0, u64::MAX - 4095, 8192)
            .unwrap();
        let len = w.finish().unwrap();
        let mut it = resources(&buf[..len]).unwrap();
        assert!(matches!(it.next(), Some(Err(HobError::BadRange { .. }))));
    }
}

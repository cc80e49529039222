//! The simulator's one call of the guest engine's `Converter::convert`, an `unsafe fn` because
//! on real memory it erases or exposes what references point at. A simulated TD has no memory
//! behind its GPAs (contents are tokens in the emulator), so its contract holds trivially here.

use accept::acceptor::Acceptor;
use accept::convert::{ConvertFailure, ConvertHooks, Converter, Visibility};
use accept::{GpaRange, Tdcall};

/// `converter.convert(..)` for a simulated TD.
///
/// # Errors
/// The conversion's [`ConvertFailure`].
#[allow(unsafe_code)]
pub fn convert_simulated<T: Tdcall + ?Sized, H: ConvertHooks + ?Sized>(
    converter: &Converter,
    tdcall: &mut T,
    acceptor: &Acceptor,
    range: GpaRange,
    to: Visibility,
    hooks: &mut H,
) -> Result<(), ConvertFailure<H::Error>> {
    // SAFETY: no memory stands behind a simulated TD's GPAs, so no reference can see the range
    // erased or exposed; each scenario converts only ranges its own vCPU owns.
    unsafe { converter.convert(tdcall, acceptor, range, to, hooks) }
}

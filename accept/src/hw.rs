//! The real TDCALL backend, through `tdx-tdcall`'s raw register-block calls.
//!
//! Compiles for any x86_64 target; runs only inside a TD (the instruction faults elsewhere).
//! It is a zero-sized value, so an exception handler can make one on the spot.

use tdx_tdcall::{td_call, td_vmcall, TdVmcallArgs, TdcallArgs};

use crate::abi::{
    leaf, page_info, vmcall, GhciStatus, Gpa, Gpaw, MapGpaOutcome, PageLevel, StatusCode,
    TdxStatus, VeInfo, VpInfo,
};
use crate::tdcall::Tdcall;

/// The TDCALL instruction. Register layouts follow the TDX module ABI and the GHCI.
#[derive(Debug, Default, Clone, Copy)]
pub struct HwTdcall;

impl Tdcall for HwTdcall {
    fn accept(&mut self, gpa: Gpa, level: PageLevel) -> TdxStatus {
        let mut args = TdcallArgs {
            rax: leaf::MEM_PAGE_ACCEPT,
            rcx: page_info(gpa, level),
            ..Default::default()
        };
        TdxStatus::from_raw(td_call(&mut args))
    }

    fn map_gpa(&mut self, start: u64, len: u64) -> MapGpaOutcome {
        let mut args = TdVmcallArgs {
            r10: 0,
            r11: vmcall::MAP_GPA,
            r12: start,
            r13: len,
            ..Default::default()
        };
        // `td_vmcall` traps (ud2) if the TDCALL itself fails, so a return means RAX was 0.
        let r10 = td_vmcall(&mut args);
        MapGpaOutcome {
            tdcall: TdxStatus::SUCCESS,
            status: GhciStatus::from_raw(r10),
            resume_gpa: args.r11,
        }
    }

    fn ve_info(&mut self) -> Result<VeInfo, TdxStatus> {
        let mut args = TdcallArgs {
            rax: leaf::VP_VEINFO_GET,
            ..Default::default()
        };
        let status = TdxStatus::from_raw(td_call(&mut args));
        if !status.is_success() {
            return Err(status);
        }
        Ok(VeInfo {
            exit_reason: args.rcx as u32,
            exit_qualification: args.rdx,
            gla: args.r8,
            gpa: args.r9,
            instruction_length: args.r10 as u32,
            instruction_info: (args.r10 >> 32) as u32,
        })
    }

    fn vp_info(&mut self) -> Result<VpInfo, TdxStatus> {
        let mut args = TdcallArgs {
            rax: leaf::VP_INFO,
            ..Default::default()
        };
        let status = TdxStatus::from_raw(td_call(&mut args));
        if !status.is_success() {
            return Err(status);
        }
        let gpaw = Gpaw::from_width(args.rcx & 0x3F)
            .ok_or(StatusCode::OperandInvalid.with_operand(crate::abi::operand::RCX))?;
        Ok(VpInfo {
            gpaw,
            attributes: args.rdx,
            num_vcpus: args.r8 as u32,
            max_vcpus: (args.r8 >> 32) as u32,
            vcpu_index: args.r9 as u32,
        })
    }
}

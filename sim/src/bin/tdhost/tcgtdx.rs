//! Serving the patched QEMU of `cargo xtask e2e --tcg-tdx`, whose TCG executes TDCALL and checks
//! every guest access to private memory against this emulator's Secure-EPT.
//!
//! Two sockets:
//!
//! - the vCPU socket (QEMU's `TDMEM_TCG_TDX`): each QEMU vCPU connects on its first TDCALL or
//!   access check and opens with `Attach { vcpu }`; a thread per connection answers its
//!   `Tdcall` and `Access` requests as that vCPU's instructions, so the vCPUs' calls run in
//!   parallel against the host half, as they would against a module;
//! - the control link (QEMU's COM2, as in the ordinary run): the image's hello and its two
//!   DONE requests, one per part.
//!
//! The single-vCPU part runs on a one-vCPU host and the multi-CPU part on a fresh four-vCPU
//! host, as in the ordinary run: at the first DONE the host of the first part is checked and
//! reported, and the second takes its place before the image is answered, so every request of
//! the second part meets the second host.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use e2e_proto::smp;
use e2e_proto::wire::{Answer, Request};
use hostvmm::module::AccessKind;

use crate::checks::SmpExtra;
use crate::exec::{lock, Exec};
use crate::serve::{accept, bad_request, listen, serve_link};

/// The host the requests of the running part go to.
type Current = RwLock<Arc<Exec>>;

fn current(c: &Current) -> Arc<Exec> {
    Arc::clone(&c.read().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// What crossed the vCPU links over both parts.
#[derive(Debug, Default, Clone, Copy)]
struct Crossed {
    tdcalls: u64,
    accesses: u64,
    ve_injected: u64,
}

impl Crossed {
    fn add(&mut self, exec: &Exec) {
        let r = lock(&exec.requests);
        self.tdcalls += r.get("tdcall").copied().unwrap_or(0);
        self.accesses += r.get("access").copied().unwrap_or(0);
        self.ve_injected += exec.host.module().stats().access(AccessKind::Ve);
    }
}

/// One QEMU vCPU's link: `Attach` first, then its requests, until QEMU closes it or `stop`.
fn serve_vcpu(
    mut stream: std::os::unix::net::UnixStream,
    cur: &Current,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<(), String> {
    let mut vcpu: Option<usize> = None;
    serve_link(&mut stream, deadline, stop, |req| match (req, vcpu) {
        (Ok(req @ Request::Attach { vcpu: v, .. }), None) => {
            let a = current(cur).answer(v as usize, req);
            if a == Answer::Ack {
                vcpu = Some(v as usize);
            }
            (a, false)
        }
        (Ok(Request::Attach { .. }), Some(_)) => (Answer::Fatal(10), true),
        (Ok(req), Some(v)) => (current(cur).answer(v, req), false),
        (Ok(_), None) => (Answer::Fatal(11), true),
        (Err(e), _) => (bad_request(e), false),
    })
}

/// Serves a `--tcg-tdx` run: the control link on `com2`, the vCPUs on `vcpus`. True when both
/// parts passed their checks.
pub(crate) fn serve_tcg_tdx(com2: &Path, vcpus: &Path, timeout: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    let vcpu_listener = listen(vcpus)?;
    let control = listen(com2)?;
    eprintln!(
        "tdhost: TCG-TDX: control link on {}, vCPU links on {}",
        com2.display(),
        vcpus.display()
    );
    let cur: Current = RwLock::new(Arc::new(Exec::new(1)));
    let stop = AtomicBool::new(false);
    let mut verdicts = (false, false);
    let mut crossed = Crossed::default();
    let served: Result<(), String> = std::thread::scope(|scope| {
        let (cur_ref, stop_ref) = (&cur, &stop);
        scope.spawn(move || {
            let mut n = 0usize;
            while let Ok(Some(stream)) = accept(&vcpu_listener, deadline, stop_ref) {
                n += 1;
                eprintln!("tdhost: TCG-TDX: vCPU link {n} connected");
                scope.spawn(move || {
                    if let Err(e) = serve_vcpu(stream, cur_ref, stop_ref, deadline) {
                        eprintln!("tdhost: vCPU link: {e}");
                    }
                });
            }
        });
        let r = (|| {
            let Some(mut stream) = accept(&control, deadline, &stop)? else {
                return Err("no control link".into());
            };
            eprintln!("tdhost: image connected");
            let mut part = 1;
            serve_link(&mut stream, deadline, &stop, |req| match req {
                Ok(done @ Request::Done { .. }) if part == 1 => {
                    let first = current(&cur);
                    let a = first.answer(0, done);
                    verdicts.0 = first.report("tcg-tdx");
                    crossed.add(&first);
                    // The second part's host is in place before the image hears back.
                    *cur.write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Arc::new(Exec::new(smp::CPUS as u32));
                    part = 2;
                    (a, false)
                }
                Ok(done @ Request::Done { .. }) => {
                    let second = current(&cur);
                    let a = second.answer(0, done);
                    let extra = SmpExtra::from_done(&done).unwrap_or_default();
                    verdicts.1 = second.report_smp("tcg-tdx", &extra);
                    crossed.add(&second);
                    (a, true)
                }
                Ok(req) => (current(&cur).answer(0, req), false),
                Err(e) => (bad_request(e), false),
            })
        })();
        stop.store(true, Ordering::Release);
        r
    });
    served?;
    println!(
        "TDMEM-HOST-TCG-TDX tdcalls={} accesses={} ve_injected={}",
        crossed.tdcalls, crossed.accesses, crossed.ve_injected
    );
    Ok(verdicts.0 && verdicts.1)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use accept::abi::{leaf, page_info, Gpa, PageLevel};
    use e2e_proto::wire::{self, Decoder, MAX_ARGS, TDCALL_REGS, VERSION};

    use super::*;

    /// One request on `s`, one answer back, as QEMU's helper does.
    fn call(s: &mut UnixStream, req: Request) -> Answer {
        let mut out = [0u8; wire::MAX_FRAME];
        let n = req.to_frame().encode(&mut out);
        s.write_all(&out[..n]).expect("send");
        let mut dec = Decoder::new();
        let mut b = [0u8; 1];
        loop {
            s.read_exact(&mut b).expect("answer");
            if let Some(f) = dec.push(b[0]) {
                return Answer::from_frame(&f.expect("a frame")).expect("an answer");
            }
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
    }

    fn tdcall(rax: u64, rcx: u64) -> Request {
        let mut regs = [0; TDCALL_REGS];
        regs[0] = rax;
        regs[1] = rcx;
        Request::Tdcall { regs }
    }

    fn access(gpa: u64, probe: bool) -> Request {
        Request::Access {
            gpa,
            write: true,
            fetch: false,
            probe,
        }
    }

    fn done() -> Request {
        Request::Done {
            status: 0,
            counts: [0; MAX_ARGS - 1],
            n: 0,
        }
    }

    /// A QEMU vCPU's link as the patched QEMU drives it: attach, TDCALLs as register blocks,
    /// access checks that fault the page in and inject #VE, probes that change nothing; then
    /// the control link's two DONEs end the run.
    #[test]
    fn a_vcpu_link_is_served_as_the_module_would() {
        let dir = std::env::temp_dir().join(format!("tdhost-tcgtdx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let (c, v) = (dir.join("c.sock"), dir.join("v.sock"));
        let verdict = std::thread::scope(|scope| {
            let server = scope.spawn(|| serve_tcg_tdx(&c, &v, Duration::from_secs(60)));
            let mut vcpu = connect(&v);
            let mut control = connect(&c);
            // Before Attach nothing is served.
            let attach = Request::Attach {
                version: VERSION,
                vcpu: 0,
            };
            assert_eq!(call(&mut vcpu, attach), Answer::Ack);
            match call(&mut vcpu, tdcall(leaf::VP_INFO, 0)) {
                Answer::Regs(r) => {
                    assert_eq!((r.rax, r.rcx & 0x3F, r.r8 & 0xFFFF_FFFF), (0, 48, 1))
                }
                other => panic!("VP.INFO: {other:?}"),
            }
            // The image's memory is MAPPED; 200 MiB is not, and a probe leaves it so.
            let gpa = 200 << 20;
            assert_eq!(
                call(&mut vcpu, access(0x1000, true)),
                Answer::Regs(Default::default())
            );
            for _ in 0..2 {
                match call(&mut vcpu, access(gpa, true)) {
                    Answer::Regs(r) => assert_eq!(r.rax, 1),
                    other => panic!("probe: {other:?}"),
                }
            }
            // A real access: EPT violation handled (AUG PENDING), then #VE.
            assert_eq!(call(&mut vcpu, access(gpa, false)), Answer::Reexecute);
            assert_eq!(call(&mut vcpu, access(gpa, false)), Answer::InjectVe);
            match call(&mut vcpu, tdcall(leaf::VP_VEINFO_GET, 0)) {
                // The access was a store: the exit qualification's write bit is set.
                Answer::Regs(r) => assert_eq!((r.rax, r.r9, r.rdx & 2), (0, gpa, 2)),
                other => panic!("VEINFO.GET: {other:?}"),
            }
            let info = page_info(Gpa::new_truncate(gpa), PageLevel::Size2M);
            assert_eq!(
                call(&mut vcpu, tdcall(leaf::MEM_PAGE_ACCEPT, info)),
                Answer::Regs(Default::default())
            );
            assert_eq!(
                call(&mut vcpu, access(gpa, false)),
                Answer::Regs(Default::default())
            );
            // An unknown leaf is answered on the spot.
            match call(&mut vcpu, tdcall(99, 0)) {
                Answer::Regs(r) => assert_ne!(r.rax, 0),
                other => panic!("leaf 99: {other:?}"),
            }
            let hello = Request::Hello { version: VERSION };
            assert_eq!(call(&mut control, hello), Answer::Ack);
            assert_eq!(call(&mut control, done()), Answer::Ack);
            assert_eq!(call(&mut control, done()), Answer::Ack);
            drop(vcpu);
            server.join().expect("server thread")
        });
        let _ = std::fs::remove_dir_all(&dir);
        // The DONEs carried no self-test results, so the checks fail; the run itself ended.
        assert_eq!(verdict, Ok(false));
    }
}

//! Serving QEMU: the single-vCPU part over a Unix socket, the multi-CPU part through the
//! per-vCPU mailboxes in QEMU's guest RAM file.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e_proto::mailbox;
use e2e_proto::smp;
use e2e_proto::wire::{self, Answer, Decoder, Request};

use crate::checks::SmpExtra;
use crate::exec::Exec;

/// Serves vCPU `vcpu`'s mailbox in `mem` (QEMU's guest RAM file) until `stop` is set or the
/// deadline passes. Returns the DONE request when this vCPU sent it.
fn serve_mailbox(
    exec: &Exec,
    mem: &std::fs::File,
    vcpu: usize,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<Option<Request>, String> {
    let base = mailbox::gpa(vcpu as u64);
    let read_u64 = |at: u64| -> Result<u64, String> {
        let mut b = [0u8; 8];
        mem.read_exact_at(&mut b, at)
            .map_err(|e| format!("mailbox {vcpu}: {e}"))?;
        Ok(u64::from_le_bytes(b))
    };
    let mut last = read_u64(base + mailbox::ANS_SEQ)?;
    let mut idle = 0u32;
    let mut frame = [0u8; wire::MAX_FRAME];
    let mut out = [0u8; wire::MAX_FRAME];
    while !stop.load(Ordering::Acquire) {
        // The image bumps the number by one per request; any other value is a store in
        // progress.
        if read_u64(base + mailbox::REQ_SEQ)? != last + 1 {
            idle = idle.saturating_add(1);
            if idle < 256 {
                std::thread::yield_now();
            } else {
                if Instant::now() > deadline {
                    return Err(format!("mailbox {vcpu}: timeout"));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            continue;
        }
        idle = 0;
        last += 1;
        mem.read_exact_at(&mut frame, base + mailbox::REQ_FRAME)
            .map_err(|e| format!("mailbox {vcpu}: {e}"))?;
        let req = wire::decode(&frame).and_then(|f| Request::from_frame(&f));
        let answer = match req {
            Ok(req) => exec.answer(vcpu, req),
            Err(e) => {
                eprintln!("tdhost: vCPU {vcpu}: bad request {e:?}");
                Answer::Fatal(8)
            }
        };
        let len = answer.to_frame().encode(&mut out);
        mem.write_all_at(&out[..len], base + mailbox::ANS_FRAME)
            .and_then(|()| mem.write_all_at(&last.to_le_bytes(), base + mailbox::ANS_SEQ))
            .map_err(|e| format!("mailbox {vcpu}: {e}"))?;
        if let Ok(done @ Request::Done { .. }) = req {
            stop.store(true, Ordering::Release);
            return Ok(Some(done));
        }
    }
    Ok(None)
}

/// The multi-CPU part over the mailboxes in QEMU's guest RAM file `path`: a server thread per
/// vCPU on a host of its own, until vCPU 0 sends DONE.
pub(crate) fn serve_smp(path: &Path, deadline: Instant) -> Result<bool, String> {
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let exec = Exec::new(smp::CPUS as u32);
    let stop = AtomicBool::new(false);
    eprintln!(
        "tdhost: serving {} vCPU mailboxes in {}",
        smp::CPUS,
        path.display()
    );
    let results: Vec<Result<Option<Request>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..smp::CPUS)
            .map(|vcpu| {
                let (exec, mem, stop) = (&exec, &mem, &stop);
                scope.spawn(move || {
                    let r = serve_mailbox(exec, mem, vcpu, stop, deadline);
                    if r.is_err() {
                        stop.store(true, Ordering::Release);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("server thread panicked".into()))
            })
            .collect()
    });
    let mut extra = SmpExtra::default();
    for r in results {
        if let Some(done) = r? {
            extra = SmpExtra::from_done(&done).unwrap_or_default();
        }
    }
    Ok(exec.report_smp("qemu", &extra))
}

/// Binds a Unix socket at `path` (replacing a stale one), non-blocking.
pub(crate) fn listen(path: &Path) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

/// The next connection on `listener`, blocking with 200 ms read timeouts; `None` when `stop` is
/// set first.
pub(crate) fn accept(
    listener: &UnixListener,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<Option<UnixStream>, String> {
    let stream = loop {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("no connection before the timeout".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(200))))
        .map_err(|e| format!("socket: {e}"))?;
    Ok(Some(stream))
}

/// Serves frames on `stream`: each request goes to `handle`, which returns the answer and
/// whether the link is done after it. Ends at that, at end of stream, when `stop` is set, or at
/// the deadline (a timeout is logged, not an error: the checks then fail).
pub(crate) fn serve_link(
    stream: &mut UnixStream,
    deadline: Instant,
    stop: &AtomicBool,
    mut handle: impl FnMut(Result<Request, wire::WireError>) -> (Answer, bool),
) -> Result<(), String> {
    let mut dec = Decoder::new();
    let mut buf = [0u8; 4096];
    let mut out = [0u8; wire::MAX_FRAME];
    let mut bad_bytes = 0u64;
    'run: while !stop.load(Ordering::Acquire) {
        if Instant::now() > deadline {
            eprintln!("tdhost: timeout");
            break;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(e) => return Err(format!("read: {e}")),
        };
        for &b in &buf[..n] {
            match dec.push(b) {
                None => {}
                Some(Err(_)) => bad_bytes += 1,
                Some(Ok(frame)) => {
                    let (answer, done) = handle(Request::from_frame(&frame));
                    let len = answer.to_frame().encode(&mut out);
                    stream
                        .write_all(&out[..len])
                        .map_err(|e| format!("write: {e}"))?;
                    if done {
                        break 'run;
                    }
                }
            }
        }
    }
    if bad_bytes != 0 {
        eprintln!("tdhost: {bad_bytes} bytes outside frames");
    }
    Ok(())
}

/// Answers a request the link could not decode.
pub(crate) fn bad_request(e: wire::WireError) -> Answer {
    eprintln!("tdhost: bad request {e:?}");
    Answer::Fatal(8)
}

/// The single-vCPU part over the Unix socket `path` (QEMU's COM2), until the image's DONE.
pub(crate) fn serve(path: &Path, timeout: Duration) -> Result<bool, String> {
    let listener = listen(path)?;
    eprintln!("tdhost: listening on {}", path.display());
    let deadline = Instant::now() + timeout;
    let never = AtomicBool::new(false);
    let Some(mut stream) = accept(&listener, deadline, &never)? else {
        return Err("no connection".into());
    };
    eprintln!("tdhost: image connected");
    let exec = Exec::new(1);
    serve_link(&mut stream, deadline, &never, |req| match req {
        Ok(req) => (exec.answer(0, req), matches!(req, Request::Done { .. })),
        Err(e) => (bad_request(e), false),
    })?;
    Ok(exec.report("qemu"))
}

#[cfg(test)]
mod tests {
    use e2e_proto::selftest::IMAGE_END;

    use super::*;
    use crate::exec::lock;

    /// The image's end of a mailbox, written as the image does: frame, then the number.
    fn guest_call(mem: &std::fs::File, vcpu: u64, seq: u64, req: Request) -> Answer {
        let base = mailbox::gpa(vcpu);
        let mut out = [0u8; wire::MAX_FRAME];
        let n = req.to_frame().encode(&mut out);
        mem.write_all_at(&out[..n], base + mailbox::REQ_FRAME)
            .and_then(|()| mem.write_all_at(&seq.to_le_bytes(), base + mailbox::REQ_SEQ))
            .expect("write the request");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut b = [0u8; 8];
            mem.read_exact_at(&mut b, base + mailbox::ANS_SEQ)
                .expect("read the answer number");
            if u64::from_le_bytes(b) == seq {
                break;
            }
            assert!(Instant::now() < deadline, "no answer to request {seq}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut frame = [0u8; wire::MAX_FRAME];
        mem.read_exact_at(&mut frame, base + mailbox::ANS_FRAME)
            .expect("read the answer");
        Answer::from_frame(&wire::decode(&frame).expect("a frame")).expect("an answer")
    }

    #[test]
    fn a_mailbox_is_served_as_its_own_vcpu_until_done() {
        let path = std::env::temp_dir().join(format!("tdhost-mailbox-{}", std::process::id()));
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the RAM file");
        mem.set_len(IMAGE_END).expect("size the RAM file");
        let exec = Exec::new(smp::CPUS as u32);
        let stop = AtomicBool::new(false);
        let done = std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(30);
                serve_mailbox(&exec, &mem, 2, &stop, deadline)
            });
            let hello = Request::Hello {
                version: wire::VERSION,
            };
            assert_eq!(guest_call(&mem, 2, 1, hello), Answer::Ack);
            // TDG.VP.INFO answered as vCPU 2 of four.
            match guest_call(&mem, 2, 2, Request::VpInfo) {
                Answer::Regs(r) => {
                    assert_eq!((r.rax, r.rcx & 0x3F, r.r9), (0, 48, 2));
                    assert_eq!(r.r8 & 0xFFFF_FFFF, smp::CPUS as u64);
                }
                other => panic!("VP.INFO: {other:?}"),
            }
            let done = Request::Done {
                status: 0,
                counts: [0; wire::MAX_ARGS - 1],
                n: 0,
            };
            assert_eq!(guest_call(&mem, 2, 3, done), Answer::Ack);
            server.join().expect("server thread")
        });
        let _ = std::fs::remove_file(&path);
        assert!(matches!(done, Ok(Some(Request::Done { .. }))), "{done:?}");
        assert!(stop.load(Ordering::Acquire));
        assert_eq!(lock(&exec.requests).get("vp_info"), Some(&1));
    }
}

//! Native-context submit streams against a live session: arbitrary
//! `SUBMIT_3D` payloads (some framed as requests, some raw) go to a compute
//! backend on the simulated GPU over real guest RAM. The backend must never
//! panic, must keep answering the session afterwards, and must free
//! everything when the context is destroyed.

#![no_main]

use std::time::Duration;

use guest_proto::reply::Reply;
use guest_proto::writer::RequestWriter;
use guest_proto::{Request, ResourceId, Status};
use libfuzzer_sys::fuzz_target;
use vhost_gpu_nc::compute::ComputeConfig;
use vhost_gpu_nc::compute::testing::TestGuest;
use vhost_gpu_nc::context_backend::{ContextBackend, ContextInit, CtxId};
use vhost_gpu_nc_fuzz::{session_init, sim_device};

const CTX: CtxId = CtxId(1);
const SESSION: u32 = 100;
const DATA: u32 = 101;

/// Sends `request` with its reply at offset 0 and returns the reply.
fn call(g: &TestGuest, session_gpa: u64, seqno: u32, request: &Request<'_>) -> Option<Reply> {
    let mut w = RequestWriter::new(0..4096).with_first_seqno(seqno);
    w.push(request).ok()?;
    let _ = g.nc().submit(CTX, w.as_bytes(), None);
    Reply::decode(&g.read::<80>(session_gpa)).ok()
}

fuzz_target!(|data: &[u8]| {
    let config = ComputeConfig {
        fault_timeout: Duration::from_millis(5),
        max_pending_faults: 64,
        ..ComputeConfig::default()
    };
    let mut g = TestGuest::new(sim_device(), config, 32 << 20);
    g.nc()
        .create_context(CTX, ContextInit { capset_id: None }, "fuzz")
        .expect("context");
    let session_gpa = g.resource(CTX, SESSION, 16384);
    let _ = g.resource(CTX, DATA, 1 << 16);
    let init = call(
        &g,
        session_gpa,
        1,
        &Request::SessionInit(session_init(ResourceId(SESSION))),
    )
    .expect("reply");
    assert_eq!(init.status, Status::Ok);
    // The input is a list of submits: a byte n, then 8·n bytes of payload
    // (requests are multiples of 8 bytes long).
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = (usize::from(n) * 8).min(tail.len());
        let (stream, tail) = tail.split_at(n);
        let _ = g.nc().submit(CTX, stream, None);
        g.nc().tick();
        rest = tail;
    }
    // Still serving: a query answers (after a SESSION_DESTROY in the input,
    // a new session starts first).
    let query = call(&g, session_gpa, 0x7000_0000, &Request::DeviceQuery);
    if query.is_none_or(|r| r.seqno != 0x7000_0000 || r.status != Status::Ok) {
        let again = call(
            &g,
            session_gpa,
            0x7000_0001,
            &Request::SessionInit(session_init(ResourceId(SESSION))),
        );
        let again = again.expect("reply");
        assert!(
            again.status == Status::Ok || again.status == Status::SessionActive,
            "{again:?}"
        );
        let query = call(&g, session_gpa, 0x7000_0002, &Request::DeviceQuery).expect("reply");
        assert_eq!((query.seqno, query.status), (0x7000_0002, Status::Ok));
    }
    g.nc().destroy_context(CTX);
});

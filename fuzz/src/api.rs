//! The API: raw HTTP bytes → the incremental parser → the router → the body → the VMM
//! action, applied by the action handler of a VM that is not started.
//!
//! Invariants: nothing panics; the parser gives the same requests and faults whether the
//! bytes arrive at once or in pieces, and never buffers more than a head plus a body; a
//! routed action re-serialized into a request routes to the same action; whatever the
//! handler accepted is valid: `GET /vm/config` (once a kernel is set) parses as a config
//! file and validates, and `GET /machine-config` parses and validates.

use kiln::api::actions::{ActionHandler, Outcome};
use kiln::api::http::{Event, MAX_HEAD_BYTES, RequestParser};
use kiln::api::{MachineConfigUpdate, VmmAction, VmmResponse, handle_bytes, route};
use kiln::config::{BUILTIN_KERNEL, MachineConfig, VmConfig, from_json, validate_machine};

use crate::wire::{self, Enc, U, Wire};

/// A fuzz input: where to cut the byte stream, the payload limit, and the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Pieces are cut every `1 + chunk` bytes.
    pub chunk: u8,
    /// Payload limit: 1 KiB << (this % 8) (51200, the default, when 0).
    pub limit: u8,
    /// The bytes of the connection.
    pub bytes: Vec<u8>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            chunk: wire::u8(u),
            limit: wire::u8(u),
            bytes: wire::rest(u),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u8(self.chunk).u8(self.limit).raw(&self.bytes);
    }
}

crate::arbitrary_via_wire!(Input);

/// The request that expresses `action` (method, path, body).
pub fn request_for(action: &VmmAction) -> (&'static str, String, String) {
    let j = |v: &dyn erased::Ser| v.json();
    match action {
        VmmAction::GetInstanceInfo => ("GET", "/".into(), String::new()),
        VmmAction::GetVersion => ("GET", "/version".into(), String::new()),
        VmmAction::GetMachineConfig => ("GET", "/machine-config".into(), String::new()),
        VmmAction::GetVmConfig => ("GET", "/vm/config".into(), String::new()),
        VmmAction::PutMachineConfig(m) => ("PUT", "/machine-config".into(), j(m)),
        VmmAction::PatchMachineConfig(u) => ("PATCH", "/machine-config".into(), j(u)),
        VmmAction::PutBootSource(b) => ("PUT", "/boot-source".into(), j(b)),
        VmmAction::PutDrive(d) => ("PUT", format!("/drives/{}", d.drive_id), j(d)),
        VmmAction::PatchDrive(u) => ("PATCH", format!("/drives/{}", u.drive_id), j(u)),
        VmmAction::PutNetworkInterface(n) => {
            ("PUT", format!("/network-interfaces/{}", n.iface_id), j(n))
        }
        VmmAction::PatchNetworkInterface(u) => {
            ("PATCH", format!("/network-interfaces/{}", u.iface_id), j(u))
        }
        VmmAction::PutLogger(l) => ("PUT", "/logger".into(), j(l)),
        VmmAction::PutMetrics(m) => ("PUT", "/metrics".into(), j(m)),
        VmmAction::InstanceStart => (
            "PUT",
            "/actions".into(),
            r#"{"action_type":"InstanceStart"}"#.into(),
        ),
        VmmAction::SendCtrlAltDel => (
            "PUT",
            "/actions".into(),
            r#"{"action_type":"SendCtrlAltDel"}"#.into(),
        ),
        VmmAction::FlushMetrics => (
            "PUT",
            "/actions".into(),
            r#"{"action_type":"FlushMetrics"}"#.into(),
        ),
        VmmAction::Pause => ("PATCH", "/vm".into(), r#"{"state":"Paused"}"#.into()),
        VmmAction::Resume => ("PATCH", "/vm".into(), r#"{"state":"Resumed"}"#.into()),
        VmmAction::CreateSnapshot(p) => ("PUT", "/snapshot/create".into(), j(p)),
        VmmAction::LoadSnapshot(p) => ("PUT", "/snapshot/load".into(), j(p)),
        VmmAction::ReceiveMigration(p) => ("PUT", "/migration/receive".into(), j(p)),
        VmmAction::SendMigration(p) => ("PUT", "/migration/send".into(), j(p)),
    }
}

mod erased {
    /// Serializes any config type to JSON.
    pub trait Ser {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("a parsed body serializes")
        }
    }
}

/// What the harness lets the handler do: nothing that writes files or starts a VM.
fn sanitized(action: VmmAction) -> Option<VmmAction> {
    match action {
        VmmAction::InstanceStart | VmmAction::PutLogger(_) | VmmAction::PutMetrics(_) => None,
        VmmAction::PutBootSource(mut b) => {
            // Paths are opened: point them at harmless files.
            if !b.kernel_image_path.is_empty() {
                b.kernel_image_path = BUILTIN_KERNEL.into();
            }
            if let Some(p) = &mut b.initrd_path
                && !p.is_empty()
            {
                *p = "/dev/null".into();
            }
            Some(VmmAction::PutBootSource(b))
        }
        other => Some(other),
    }
}

fn json_of(r: Outcome) -> String {
    match r {
        Outcome::Respond(VmmResponse::Json(s)) => s,
        other => panic!("a GET answered {other:?}"),
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let limit = match input.limit % 8 {
        0 => kiln::api::DEFAULT_MAX_PAYLOAD,
        n => 1024 << n,
    };
    let whole = RequestParser::new(limit).feed(&input.bytes);
    let mut pieces = Vec::new();
    let mut parser = RequestParser::new(limit);
    for chunk in input.bytes.chunks(usize::from(input.chunk) + 1) {
        pieces.extend(parser.feed(chunk));
        assert!(
            parser.buffered() <= MAX_HEAD_BYTES + limit + chunk.len(),
            "the parser holds {} bytes",
            parser.buffered()
        );
    }
    assert_eq!(
        whole,
        pieces,
        "parsing at once vs in pieces of {}",
        input.chunk as usize + 1
    );
    let _ = handle_bytes(&input.bytes, limit);

    let mut handler = ActionHandler::new("fuzz".into());
    for event in whole {
        let Event::Request(req) = event else { continue };
        let Ok(action) = route(&req.method, &req.path, &req.body) else {
            continue;
        };
        let (method, path, body) = request_for(&action);
        match route(method, &path, body.as_bytes()) {
            Ok(again) => assert_eq!(again, action, "{method} {path} {body}"),
            Err(e) => {
                panic!("re-serialized {action:?} does not route: {e:?}\n{method} {path} {body}")
            }
        }
        if let VmmAction::PatchMachineConfig(u) = &action {
            assert_ne!(
                *u,
                MachineConfigUpdate::default(),
                "an empty PATCH was routed"
            );
        }
        let Some(action) = sanitized(action) else {
            continue;
        };
        let _ = handler.handle_preboot(action);

        let machine = json_of(handler.handle_preboot(VmmAction::GetMachineConfig));
        let m: MachineConfig = from_json(&machine).expect("GET /machine-config parses");
        assert!(
            validate_machine(&m).is_ok(),
            "the handler holds an invalid machine config: {machine}"
        );
        let doc = json_of(handler.handle_preboot(VmmAction::GetVmConfig));
        if doc.contains("\"boot-source\"") {
            let c: VmConfig = match from_json(&doc) {
                Ok(c) => c,
                Err(e) => panic!("GET /vm/config is not a config file: {e}\n{doc}"),
            };
            if let Err(e) = c.validate() {
                panic!("the handler accepted an invalid configuration: {e}\n{doc}");
            }
        }
    }
}

//! ps-lite's message header, `PBMeta` (proto2), encoded and decoded by hand.
//!
//! A ps-lite message is one meta frame followed by its data frames; the meta says what the
//! message is (a control command, a key-value request or response, a command to the servers)
//! and which data frames follow. Field numbers and defaults are those of MXNet 1.9.1's
//! ps-lite (`src/meta.proto`); the encoder writes the fields ps-lite's own encoder always
//! writes (`head`, `request`, `push`, `pull`, `simple_app`, `customer_id`, `priority`, with
//! [`UNSET`] for an unset `head` or `customer_id`), so that a message reads the same to an
//! MXNet node as one of its own. The decoder skips fields it does not know.
//!
//! ```
//! use kvstore_pslite::meta::{Command, Control, Meta, NodeRecord, Role};
//! let mut meta = Meta::default();
//! meta.control = Some(Control::new(Command::AddNode).with_node(NodeRecord::new(
//!     Role::Worker,
//!     "127.0.0.1",
//!     9000,
//! )));
//! let bytes = meta.encode();
//! assert_eq!(Meta::decode(&bytes).unwrap(), meta);
//! ```

use std::fmt;

/// ps-lite's value for an unset `head`, `customer_id` or node id (`INT_MAX`).
pub const UNSET: i32 = i32::MAX;

/// A node's role, as ps-lite numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A server (0).
    Server,
    /// A worker (1).
    Worker,
    /// The scheduler (2).
    Scheduler,
}

impl Role {
    fn code(self) -> i64 {
        match self {
            Role::Server => 0,
            Role::Worker => 1,
            Role::Scheduler => 2,
        }
    }

    fn from_code(code: i64) -> Result<Role, DecodeError> {
        match code {
            0 => Ok(Role::Server),
            1 => Ok(Role::Worker),
            2 => Ok(Role::Scheduler),
            other => Err(DecodeError(format!("unknown node role {other}"))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Worker => "worker",
            Role::Scheduler => "scheduler",
        })
    }
}

/// A control command (`PBControl.cmd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Not a control message (0).
    Empty,
    /// A node stops its own receive loop (1; never sent between nodes).
    Terminate,
    /// Registration, and the scheduler's node table (2).
    AddNode,
    /// A barrier request to the scheduler, or its release (3).
    Barrier,
    /// An acknowledgement of the resender (4).
    Ack,
    /// A heartbeat (5).
    Heartbeat,
    /// A command this implementation does not know.
    Other(i32),
}

impl Command {
    fn code(self) -> i32 {
        match self {
            Command::Empty => 0,
            Command::Terminate => 1,
            Command::AddNode => 2,
            Command::Barrier => 3,
            Command::Ack => 4,
            Command::Heartbeat => 5,
            Command::Other(code) => code,
        }
    }

    fn from_code(code: i32) -> Command {
        match code {
            0 => Command::Empty,
            1 => Command::Terminate,
            2 => Command::AddNode,
            3 => Command::Barrier,
            4 => Command::Ack,
            5 => Command::Heartbeat,
            other => Command::Other(other),
        }
    }
}

/// One node of a control message (`PBNode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its role.
    pub role: Role,
    /// Its id ([`UNSET`] before the scheduler assigned one).
    pub id: i32,
    /// The address it listens on.
    pub hostname: String,
    /// The port it listens on.
    pub port: i32,
    /// Whether it replaces a lost node.
    pub is_recovery: bool,
    /// Its customer id (0 for MXNet's one customer).
    pub customer_id: i32,
}

impl NodeRecord {
    /// The address to reach it at, `host:port` (a port outside 16 bits, from a bad table, as 0,
    /// which no connection reaches).
    pub fn addr(&self) -> String {
        kvstore_dist::node::join_host_port(&self.hostname, u16::try_from(self.port).unwrap_or(0))
    }

    /// A node without an id yet, as a registration names it.
    pub fn new(role: Role, hostname: &str, port: u16) -> NodeRecord {
        NodeRecord {
            role,
            id: UNSET,
            hostname: hostname.to_string(),
            port: i32::from(port),
            is_recovery: false,
            customer_id: 0,
        }
    }
}

impl fmt::Display for NodeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.role)?;
        if self.id != UNSET {
            write!(f, "{} ", self.id)?;
        }
        write!(f, "at {}:{}", self.hostname, self.port)
    }
}

/// The control part of a message (`PBControl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// The command.
    pub cmd: Command,
    /// The nodes it names (registration, node table, heartbeat).
    pub nodes: Vec<NodeRecord>,
    /// The group a barrier is for (sum of 1 scheduler, 2 servers, 4 workers).
    pub barrier_group: Option<i32>,
    /// The signature an acknowledgement refers to.
    pub msg_sig: Option<u64>,
}

impl Control {
    /// A control message of `cmd` without nodes.
    pub fn new(cmd: Command) -> Control {
        Control {
            cmd,
            nodes: Vec::new(),
            barrier_group: None,
            msg_sig: None,
        }
    }

    /// The same with `node` added.
    pub fn with_node(mut self, node: NodeRecord) -> Control {
        self.nodes.push(node);
        self
    }
}

/// ps-lite's data-type tags of data frames (`data_type`).
pub mod data_type {
    /// 32-bit signed integers (the `lens` frame).
    pub const INT32: i32 = 3;
    /// 64-bit unsigned integers (the `keys` frame).
    pub const UINT64: i32 = 8;
    /// Anything else: MXNet's values travel as `char`, which ps-lite tags so.
    pub const OTHER: i32 = 11;
}

/// A message header (`PBMeta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The application's command word (MXNet: the request type and dtype of a key-value
    /// message, the command of a server command); [`UNSET`] when unset.
    pub head: i32,
    /// The application's body (MXNet: a server command's argument).
    pub body: Vec<u8>,
    /// Set for control messages.
    pub control: Option<Control>,
    /// A request (else the response to the request with the same timestamp).
    pub request: bool,
    /// A push.
    pub push: bool,
    /// A pull.
    pub pull: bool,
    /// A `SimpleApp` message (MXNet: commands to the servers).
    pub simple_app: bool,
    /// The application id (MXNet: 0).
    pub app_id: Option<i32>,
    /// The request's timestamp, echoed by its responses.
    pub timestamp: Option<i32>,
    /// The type tag of each data frame.
    pub data_type: Vec<i32>,
    /// The customer id (MXNet: 0); [`UNSET`] when unset.
    pub customer_id: i32,
    /// The request's priority.
    pub priority: i32,
}

impl Default for Meta {
    fn default() -> Meta {
        Meta {
            head: UNSET,
            body: Vec::new(),
            control: None,
            request: false,
            push: false,
            pull: false,
            simple_app: false,
            app_id: None,
            timestamp: None,
            data_type: Vec::new(),
            customer_id: UNSET,
            priority: 0,
        }
    }
}

/// A meta frame that is not a valid `PBMeta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad ps-lite meta: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

// Protobuf wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH: u64 = 2;
const FIXED32: u64 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

/// An `int32` field: negative values sign-extended to ten bytes, as protobuf does.
fn put_int32(out: &mut Vec<u8>, field: u64, v: i32) {
    put_tag(out, field, VARINT);
    put_varint(out, i64::from(v) as u64);
}

fn put_bool(out: &mut Vec<u8>, field: u64, v: bool) {
    put_tag(out, field, VARINT);
    put_varint(out, u64::from(v));
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_tag(out, field, LENGTH);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

impl NodeRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.hostname.len());
        put_int32(&mut out, 1, self.role.code() as i32);
        put_int32(&mut out, 2, self.id);
        put_bytes(&mut out, 3, self.hostname.as_bytes());
        put_int32(&mut out, 4, self.port);
        put_bool(&mut out, 5, self.is_recovery);
        put_int32(&mut out, 10, self.customer_id);
        out
    }

    fn decode(bytes: &[u8]) -> Result<NodeRecord, DecodeError> {
        let mut role = None;
        let mut node = NodeRecord::new(Role::Worker, "", 0);
        node.port = 0;
        for field in Fields::new(bytes) {
            let (number, value) = field?;
            match (number, value) {
                (1, Value::Varint(v)) => role = Some(Role::from_code(v as i64)?),
                (2, Value::Varint(v)) => node.id = v as i32,
                (3, Value::Bytes(b)) => {
                    node.hostname = String::from_utf8(b.to_vec())
                        .map_err(|_| DecodeError("a hostname is not UTF-8".into()))?
                }
                (4, Value::Varint(v)) => node.port = v as i32,
                (5, Value::Varint(v)) => node.is_recovery = v != 0,
                (10, Value::Varint(v)) => node.customer_id = v as i32,
                _ => {}
            }
        }
        node.role = role.ok_or_else(|| DecodeError("a node without its role".into()))?;
        Ok(node)
    }
}

impl Control {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_int32(&mut out, 1, self.cmd.code());
        for node in &self.nodes {
            put_bytes(&mut out, 2, &node.encode());
        }
        if let Some(group) = self.barrier_group {
            put_int32(&mut out, 3, group);
        }
        if let Some(sig) = self.msg_sig {
            put_tag(&mut out, 4, VARINT);
            put_varint(&mut out, sig);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Control, DecodeError> {
        let mut cmd = None;
        let mut control = Control::new(Command::Empty);
        for field in Fields::new(bytes) {
            let (number, value) = field?;
            match (number, value) {
                (1, Value::Varint(v)) => cmd = Some(Command::from_code(v as i32)),
                (2, Value::Bytes(b)) => control.nodes.push(NodeRecord::decode(b)?),
                (3, Value::Varint(v)) => control.barrier_group = Some(v as i32),
                (4, Value::Varint(v)) => control.msg_sig = Some(v),
                _ => {}
            }
        }
        control.cmd = cmd.ok_or_else(|| DecodeError("a control without its command".into()))?;
        Ok(control)
    }
}

impl Meta {
    /// The meta frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.body.len());
        put_int32(&mut out, 1, self.head);
        if !self.body.is_empty() {
            put_bytes(&mut out, 2, &self.body);
        }
        if let Some(control) = &self.control {
            put_bytes(&mut out, 3, &control.encode());
        }
        put_bool(&mut out, 4, self.request);
        put_bool(&mut out, 5, self.push);
        put_bool(&mut out, 6, self.simple_app);
        if let Some(app_id) = self.app_id {
            put_int32(&mut out, 7, app_id);
        }
        if let Some(timestamp) = self.timestamp {
            put_int32(&mut out, 8, timestamp);
        }
        if !self.data_type.is_empty() {
            let mut packed = Vec::with_capacity(self.data_type.len());
            for &t in &self.data_type {
                put_varint(&mut packed, i64::from(t) as u64);
            }
            put_bytes(&mut out, 9, &packed);
        }
        put_int32(&mut out, 10, self.customer_id);
        put_bool(&mut out, 12, self.pull);
        put_int32(&mut out, 13, self.priority);
        out
    }

    /// Reads a meta frame.
    ///
    /// # Errors
    /// [`DecodeError`] for bytes that are not a `PBMeta` (truncated fields, a control without
    /// its command, a node without its role).
    pub fn decode(bytes: &[u8]) -> Result<Meta, DecodeError> {
        let mut meta = Meta::default();
        for field in Fields::new(bytes) {
            let (number, value) = field?;
            match (number, value) {
                (1, Value::Varint(v)) => meta.head = v as i32,
                (2, Value::Bytes(b)) => meta.body = b.to_vec(),
                (3, Value::Bytes(b)) => meta.control = Some(Control::decode(b)?),
                (4, Value::Varint(v)) => meta.request = v != 0,
                (5, Value::Varint(v)) => meta.push = v != 0,
                (6, Value::Varint(v)) => meta.simple_app = v != 0,
                (7, Value::Varint(v)) => meta.app_id = Some(v as i32),
                (8, Value::Varint(v)) => meta.timestamp = Some(v as i32),
                (9, Value::Varint(v)) => meta.data_type.push(v as i32),
                (9, Value::Bytes(b)) => {
                    let mut at = 0;
                    while at < b.len() {
                        let (v, used) = read_varint(&b[at..])?;
                        meta.data_type.push(v as i32);
                        at += used;
                    }
                }
                (10, Value::Varint(v)) => meta.customer_id = v as i32,
                (12, Value::Varint(v)) => meta.pull = v != 0,
                (13, Value::Varint(v)) => meta.priority = v as i32,
                _ => {}
            }
        }
        Ok(meta)
    }

    /// The control command, [`Command::Empty`] for a data message.
    pub fn command(&self) -> Command {
        self.control.as_ref().map_or(Command::Empty, |c| c.cmd)
    }
}

/// A field's value.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn read_varint(bytes: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7F) << (7 * i);
        if b < 0x80 {
            return Ok((v, i + 1));
        }
    }
    Err(DecodeError("a truncated or overlong varint".into()))
}

/// The fields of a message, in order.
struct Fields<'a> {
    bytes: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields {
            bytes,
            failed: false,
        }
    }

    fn next_field(&mut self) -> Result<(u64, Value<'a>), DecodeError> {
        let (tag, used) = read_varint(self.bytes)?;
        self.bytes = &self.bytes[used..];
        let number = tag >> 3;
        let take = |bytes: &mut &'a [u8], n: usize| -> Result<&'a [u8], DecodeError> {
            if bytes.len() < n {
                return Err(DecodeError(format!("field {number} runs past the end")));
            }
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            Ok(head)
        };
        let value = match tag & 7 {
            VARINT => {
                let (v, used) = read_varint(self.bytes)?;
                self.bytes = &self.bytes[used..];
                Value::Varint(v)
            }
            FIXED64 => {
                take(&mut self.bytes, 8)?;
                Value::Fixed
            }
            LENGTH => {
                let (n, used) = read_varint(self.bytes)?;
                self.bytes = &self.bytes[used..];
                let n = usize::try_from(n)
                    .map_err(|_| DecodeError(format!("field {number} is too long")))?;
                Value::Bytes(take(&mut self.bytes, n)?)
            }
            FIXED32 => {
                take(&mut self.bytes, 4)?;
                Value::Fixed
            }
            wire => {
                return Err(DecodeError(format!(
                    "field {number} has the unknown wire type {wire}"
                )))
            }
        };
        Ok((number, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.bytes.is_empty() {
            return None;
        }
        let field = self.next_field();
        self.failed = field.is_err();
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The registration an MXNet 1.9.1 worker sent its scheduler (captured from the wire):
    /// worker at 127.0.0.1:37731.
    const MXNET_ADD_NODE: &str = "08ffffffff071a1f0802121b080110ffffffff071a093132372e302e302e3120\
                                  e3a60228005000200028003000400050ffffffff0760006800";

    #[test]
    fn a_registration_is_byte_identical_to_mxnets() {
        let mut meta = Meta {
            timestamp: Some(0),
            ..Meta::default()
        };
        meta.control = Some(Control::new(Command::AddNode).with_node(NodeRecord::new(
            Role::Worker,
            "127.0.0.1",
            37731,
        )));
        assert_eq!(meta.encode(), hex(MXNET_ADD_NODE));
        assert_eq!(Meta::decode(&hex(MXNET_ADD_NODE)).unwrap(), meta);
    }

    #[test]
    fn a_data_message_round_trips() {
        let meta = Meta {
            head: 5,
            request: true,
            push: true,
            pull: true,
            app_id: Some(0),
            timestamp: Some(123_456),
            data_type: vec![data_type::UINT64, data_type::OTHER, data_type::INT32],
            customer_id: 0,
            priority: -3,
            ..Meta::default()
        };
        assert_eq!(Meta::decode(&meta.encode()).unwrap(), meta);
        let command = Meta {
            head: 4,
            body: b"2bit,0.5".to_vec(),
            simple_app: true,
            ..Meta::default()
        };
        assert_eq!(Meta::decode(&command.encode()).unwrap(), command);
    }

    #[test]
    fn unknown_fields_are_skipped_and_bad_bytes_refused() {
        let mut bytes = Meta::default().encode();
        // field 11 (varint), field 20 (fixed32), field 21 (fixed64), field 22 (bytes)
        bytes.extend_from_slice(&[0x58, 0x05, 0xA5, 0x01, 1, 2, 3, 4]);
        bytes.extend_from_slice(&[0xA9, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0xB2, 0x01, 2, 9, 9]);
        assert_eq!(Meta::decode(&bytes).unwrap(), Meta::default());
        assert!(Meta::decode(&[0x12, 0x05, 1]).is_err(), "a truncated body");
        assert!(
            Meta::decode(&[0x1a, 0x00]).is_err(),
            "a control without its command"
        );
        assert!(Meta::decode(&[0x0b]).is_err(), "a group wire type");
        let mut overlong = vec![0x08];
        overlong.extend_from_slice(&[0xFF; 10]);
        overlong.push(0x01);
        assert!(Meta::decode(&overlong).is_err(), "an overlong varint");
    }

    #[test]
    fn random_and_mutated_frames_never_panic() {
        let valid = vec![hex(MXNET_ADD_NODE), Meta::default().encode()];
        let mut rng = kvstore_test::fuzz::Rng::new(0x0095_137E);
        for _ in 0..20_000 {
            let bytes = kvstore_test::fuzz::mutated(&mut rng, &valid);
            let _ = Meta::decode(&bytes);
        }
    }
}

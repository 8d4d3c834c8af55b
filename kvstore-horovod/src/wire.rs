//! The messages between workers, on `kvstore-dist`'s frames.
//!
//! | command | from → to | frame `key` / `aux` | payload | answer |
//! |---|---|---|---|---|
//! | [`CMD_SUBMIT`] | every rank → rank 0 (the coordinator) | rank / cycle number (bit 63: [`FRESH`]) | the [`TensorRequest`]s of a cycle: the tensors the rank's threads queued since its last cycle; none when the rank only waits for its plan | a [`Plan`] (groups ready on every rank, tensors that failed) as soon as the rank has one, or has nothing pending; at once, with whatever is there, when a later submission of the rank supersedes it; an error only for a malformed submission |
//! | [`CMD_DATA`] | rank r → rank r + 1 | group sequence number / step | a chunk of the fused buffer | empty, once received |
//!
//! Little-endian throughout.

use kvstore_base::plugin::{dtype_code, dtype_from_code};
use kvstore_base::DType;

/// A rank submits the tensors of a cycle to the coordinator, or waits for more of its plan.
pub const CMD_SUBMIT: u32 = 0x200;
/// A chunk of a ring all-reduce or of a broadcast chain.
pub const CMD_DATA: u32 = 0x201;
/// Bit 63 of a submission's `aux`: the rank has no tensor in flight, so whatever the
/// coordinator still holds for it (after the rank gave up waiting) is stale and dropped.
pub const FRESH: u64 = 1 << 63;

/// What a collective operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Sum across ranks, result on every rank.
    Allreduce,
    /// Rank 0's value on every rank.
    Broadcast,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Allreduce => 0,
            Op::Broadcast => 1,
        }
    }

    fn from_code(c: u8) -> Result<Op, String> {
        match c {
            0 => Ok(Op::Allreduce),
            1 => Ok(Op::Broadcast),
            c => Err(format!("unknown operation code {c}")),
        }
    }

    /// Horovod's name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            Op::Allreduce => "allreduce",
            Op::Broadcast => "broadcast",
        }
    }
}

/// A named tensor a rank is ready to reduce or broadcast (Horovod's `Request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRequest {
    /// The tensor's name: the key, as `str(key)` in MXNet's horovod store.
    pub name: String,
    /// The operation.
    pub op: Op,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorRequest {
    /// Bytes of the tensor.
    pub fn bytes(&self) -> u64 {
        self.checked_bytes().unwrap_or(u64::MAX)
    }

    /// Bytes of the tensor; `None` when they cannot be addressed (a shape no array has).
    fn checked_bytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_of() as u64, |n, &d| n.checked_mul(d as u64))
            .filter(|&n| n <= isize::MAX as u64)
    }
}

/// Tensors fused into one operation, in buffer order (Horovod's `Response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Position in the job's sequence of operations (every rank runs them in this order).
    pub seq: u64,
    /// The operation.
    pub op: Op,
    /// Element type of every tensor.
    pub dtype: DType,
    /// The tensors' names.
    pub names: Vec<String>,
}

/// A tensor the coordinator failed on a rank (mismatch with other ranks, stall).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The tensor's name.
    pub name: String,
    /// Why, for the error of the call that submitted it.
    pub message: String,
}

/// The coordinator's answer to a submission: groups to run, in sequence order, and failed
/// tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Groups every rank runs, in this order.
    pub groups: Vec<Group>,
    /// Tensors of this rank that will not be run.
    pub failures: Vec<Failure>,
}

impl Plan {
    /// Whether the plan says nothing.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.failures.is_empty()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end =
            end.ok_or_else(|| format!("message of {} bytes is truncated", self.bytes.len()))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn dtype(&mut self) -> Result<DType, String> {
        let c = self.u32()?;
        dtype_from_code(c).ok_or_else(|| format!("unknown dtype code {c}"))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
    fn done(&self) -> Result<(), String> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.bytes.len() - self.at))
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes the tensors of a call: `count u32`, then per tensor `op u8, dtype u32, ndim u32,
/// dims u64..., name`.
pub fn encode_requests(requests: &[TensorRequest]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(requests.len() as u32).to_le_bytes());
    for r in requests {
        out.push(r.op.code());
        out.extend_from_slice(&dtype_code(r.dtype).to_le_bytes());
        out.extend_from_slice(&(r.shape.len() as u32).to_le_bytes());
        for &d in &r.shape {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        put_string(&mut out, &r.name);
    }
    out
}

/// Decodes [`encode_requests`].
pub fn decode_requests(bytes: &[u8]) -> Result<Vec<TensorRequest>, String> {
    let mut r = Reader { bytes, at: 0 };
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let op = Op::from_code(r.u8()?)?;
        let dtype = r.dtype()?;
        let ndim = r.u32()? as usize;
        let mut shape = Vec::with_capacity(ndim.min(64));
        for _ in 0..ndim {
            shape.push(usize::try_from(r.u64()?).map_err(|_| "a dimension is too big")?);
        }
        let name = r.string()?;
        let request = TensorRequest {
            name,
            op,
            dtype,
            shape,
        };
        if request.checked_bytes().is_none() {
            return Err(format!(
                "tensor {:?} of shape {:?} has more bytes than an array can hold",
                request.name, request.shape
            ));
        }
        out.push(request);
    }
    r.done()?;
    Ok(out)
}

/// Encodes groups: `count u32`, then per group `seq u64, op u8, dtype u32, count u32, names`.
pub fn encode_groups(groups: &[Group]) -> Vec<u8> {
    let mut out = Vec::new();
    put_groups(&mut out, groups);
    out
}

fn put_groups(out: &mut Vec<u8>, groups: &[Group]) {
    out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
    for g in groups {
        out.extend_from_slice(&g.seq.to_le_bytes());
        out.push(g.op.code());
        out.extend_from_slice(&dtype_code(g.dtype).to_le_bytes());
        out.extend_from_slice(&(g.names.len() as u32).to_le_bytes());
        for name in &g.names {
            put_string(out, name);
        }
    }
}

/// Decodes [`encode_groups`].
pub fn decode_groups(bytes: &[u8]) -> Result<Vec<Group>, String> {
    let mut r = Reader { bytes, at: 0 };
    let groups = read_groups(&mut r)?;
    r.done()?;
    Ok(groups)
}

/// Encodes a plan: its groups as [`encode_groups`], then `count u32` and per failure
/// `name, message` (strings as `length u32, UTF-8`).
pub fn encode_plan(plan: &Plan) -> Vec<u8> {
    let mut out = Vec::new();
    put_groups(&mut out, &plan.groups);
    out.extend_from_slice(&(plan.failures.len() as u32).to_le_bytes());
    for f in &plan.failures {
        put_string(&mut out, &f.name);
        put_string(&mut out, &f.message);
    }
    out
}

/// Decodes [`encode_plan`].
pub fn decode_plan(bytes: &[u8]) -> Result<Plan, String> {
    let mut r = Reader { bytes, at: 0 };
    let groups = read_groups(&mut r)?;
    let n = r.u32()? as usize;
    let mut failures = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let name = r.string()?;
        let message = r.string()?;
        failures.push(Failure { name, message });
    }
    r.done()?;
    Ok(Plan { groups, failures })
}

fn read_groups(r: &mut Reader<'_>) -> Result<Vec<Group>, String> {
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let seq = r.u64()?;
        let op = Op::from_code(r.u8()?)?;
        let dtype = r.dtype()?;
        let count = r.u32()? as usize;
        let mut names = Vec::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            names.push(r.string()?);
        }
        out.push(Group {
            seq,
            op,
            dtype,
            names,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_groups_round_trip() {
        let requests = vec![
            TensorRequest {
                name: "7".into(),
                op: Op::Allreduce,
                dtype: DType::F16,
                shape: vec![2, 0, 3],
            },
            TensorRequest {
                name: "权重".into(),
                op: Op::Broadcast,
                dtype: DType::I64,
                shape: vec![],
            },
        ];
        assert_eq!(
            decode_requests(&encode_requests(&requests)).unwrap(),
            requests
        );
        let groups = vec![Group {
            seq: 42,
            op: Op::Allreduce,
            dtype: DType::U8,
            names: vec!["a".into(), "b".into()],
        }];
        assert_eq!(decode_groups(&encode_groups(&groups)).unwrap(), groups);
        let bytes = encode_groups(&groups);
        assert!(decode_groups(&bytes[..bytes.len() - 1]).is_err());
        let plan = Plan {
            groups,
            failures: vec![Failure {
                name: "w".into(),
                message: "mismatched shapes".into(),
            }],
        };
        let bytes = encode_plan(&plan);
        assert_eq!(decode_plan(&bytes).unwrap(), plan);
        assert!(decode_plan(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_plan(&encode_plan(&Plan::default()))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_shape_no_array_has_is_refused_and_never_overflows() {
        let huge = TensorRequest {
            name: "w".into(),
            op: Op::Allreduce,
            dtype: DType::F32,
            shape: vec![1 << 33, 1 << 33],
        };
        assert_eq!(huge.bytes(), u64::MAX);
        let err = decode_requests(&encode_requests(&[huge])).unwrap_err();
        assert!(err.contains("more bytes than an array can hold"), "{err}");
    }

    /// Random bytes and valid encodings cut, extended or changed: the decoders of what ranks
    /// send the coordinator, and it them, answer `Ok` or `Err`, never panic.
    #[test]
    fn decoders_never_panic_on_random_or_mutated_bytes() {
        let mut rng = kvstore_test::fuzz::Rng::new(0x2545_F491_4F6C_DD1D);
        let valid = [
            encode_requests(&[TensorRequest {
                name: "layer.weight".into(),
                op: Op::Allreduce,
                dtype: DType::F32,
                shape: vec![3, 4],
            }]),
            encode_groups(&[Group {
                seq: 1,
                op: Op::Broadcast,
                dtype: DType::F16,
                names: vec!["a".into(), "b".into()],
            }]),
            encode_plan(&Plan {
                groups: Vec::new(),
                failures: vec![Failure {
                    name: "x".into(),
                    message: "stalled".into(),
                }],
            }),
        ];
        for _ in 0..20_000 {
            let bytes = kvstore_test::fuzz::mutated(&mut rng, &valid);
            if let Ok(requests) = decode_requests(&bytes) {
                let _: u64 = requests
                    .iter()
                    .map(TensorRequest::bytes)
                    .fold(0, u64::saturating_add);
            }
            let _ = decode_groups(&bytes);
            let _ = decode_plan(&bytes);
        }
    }
}

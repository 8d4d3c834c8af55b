//! The binary format of saved updater states (documented in the crate docs).

use std::collections::BTreeMap;

use half::{bf16, f16};
use kvstore_base::{DType, Error, Key, NDArray, OptimizerSpec, ParamValue, Result};

/// The first eight bytes of every state file.
pub(crate) const MAGIC: &[u8; 8] = b"KVSOPTST";
/// The format version this build writes and reads.
pub(crate) const VERSION: u32 = 1;
const FLAG_OPTIMIZER: u32 = 1;
const MAX_DEPTH: usize = 64;
const MAX_NDIM: u32 = 32;

/// An optimizer as saved: its spec and its run-time state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedOptimizer {
    pub(crate) spec: OptimizerSpec,
    pub(crate) runtime: BTreeMap<String, ParamValue>,
}

/// One key as saved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedKey {
    pub(crate) key: Key,
    pub(crate) count: Option<u64>,
    pub(crate) master: Option<NDArray>,
    pub(crate) arrays: Vec<NDArray>,
}

/// The whole content of a state file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Saved {
    pub(crate) optimizer: Option<SavedOptimizer>,
    pub(crate) keys: Vec<SavedKey>,
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes it.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

fn dtype_code(d: DType) -> Result<u8> {
    Ok(match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::I32 => 4,
        DType::I64 => 5,
        DType::U8 => 6,
        other => {
            return Err(Error::InvalidArgument(format!(
                "dtype {other} cannot be saved in an optimizer state file"
            )))
        }
    })
}

fn dtype_of(code: u8) -> Option<DType> {
    Some(match code {
        0 => DType::F32,
        1 => DType::F64,
        2 => DType::F16,
        3 => DType::BF16,
        4 => DType::I32,
        5 => DType::I64,
        6 => DType::U8,
        _ => return None,
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) -> Result<()> {
        let n = u32::try_from(n)
            .map_err(|_| Error::InvalidArgument("too many entries to save".into()))?;
        self.u32(n);
        Ok(())
    }
    fn str(&mut self, s: &str) -> Result<()> {
        self.len(s.len())?;
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn value(&mut self, v: &ParamValue) -> Result<()> {
        match v {
            ParamValue::Bool(b) => {
                self.u8(0);
                self.u8(u8::from(*b));
            }
            ParamValue::Int(i) => {
                self.u8(1);
                self.u64(*i as u64);
            }
            ParamValue::Float(f) => {
                self.u8(2);
                self.u64(f.to_bits());
            }
            ParamValue::Str(s) => {
                self.u8(3);
                self.str(s)?;
            }
            ParamValue::List(items) => {
                self.u8(4);
                self.len(items.len())?;
                for item in items {
                    self.value(item)?;
                }
            }
            ParamValue::Map(m) => {
                self.u8(5);
                self.map(m)?;
            }
        }
        Ok(())
    }
    fn map(&mut self, m: &BTreeMap<String, ParamValue>) -> Result<()> {
        self.len(m.len())?;
        for (k, v) in m {
            self.str(k)?;
            self.value(v)?;
        }
        Ok(())
    }
    fn array(&mut self, a: &NDArray) -> Result<()> {
        let a = a.to_dense();
        self.u8(dtype_code(a.dtype())?);
        self.len(a.ndim())?;
        for &d in a.shape() {
            self.u64(d as u64);
        }
        macro_rules! put {
            ($t:ty) => {
                for x in a.to_vec::<$t>()? {
                    self.0.extend_from_slice(&x.to_le_bytes());
                }
            };
        }
        match a.dtype() {
            DType::F32 => put!(f32),
            DType::F64 => put!(f64),
            DType::F16 => put!(f16),
            DType::BF16 => put!(bf16),
            DType::I32 => put!(i32),
            DType::I64 => put!(i64),
            _ => put!(u8),
        }
        Ok(())
    }
}

/// Serialises `saved`, checksum included.
pub(crate) fn encode(saved: &Saved) -> Result<Vec<u8>> {
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(MAGIC);
    w.u32(VERSION);
    w.u32(if saved.optimizer.is_some() {
        FLAG_OPTIMIZER
    } else {
        0
    });
    if let Some(opt) = &saved.optimizer {
        w.str(&opt.spec.name)?;
        w.map(&opt.spec.params)?;
        w.map(&opt.runtime)?;
    }
    w.u64(saved.keys.len() as u64);
    for k in &saved.keys {
        match &k.key {
            Key::Int(i) => {
                w.u8(0);
                w.u64(*i as u64);
            }
            Key::Str(s) => {
                w.u8(1);
                w.str(s)?;
            }
        }
        match k.count {
            Some(c) => {
                w.u8(1);
                w.u64(c);
            }
            None => w.u8(0),
        }
        match &k.master {
            Some(m) => {
                w.u8(1);
                w.array(m)?;
            }
            None => w.u8(0),
        }
        w.len(k.arrays.len())?;
        for a in &k.arrays {
            w.array(a)?;
        }
    }
    let crc = crc32(&w.0);
    w.u32(crc);
    Ok(w.0)
}

fn corrupt(why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("corrupt optimizer state file: {why}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(corrupt(format!(
                "truncated while reading {what} at byte {} ({} bytes of content)",
                self.pos,
                self.bytes.len()
            ))),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn flag(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(corrupt(format!("{what} flag is {other}, expected 0 or 1"))),
        }
    }
    fn str(&mut self, what: &str) -> Result<String> {
        let n = self.u32(what)? as usize;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }
    fn value(&mut self, depth: usize) -> Result<ParamValue> {
        if depth > MAX_DEPTH {
            return Err(corrupt("hyper-parameters nested too deeply"));
        }
        Ok(match self.u8("a hyper-parameter tag")? {
            0 => ParamValue::Bool(self.flag("a bool hyper-parameter")?),
            1 => ParamValue::Int(self.u64("an integer hyper-parameter")? as i64),
            2 => ParamValue::Float(f64::from_bits(self.u64("a float hyper-parameter")?)),
            3 => ParamValue::Str(self.str("a string hyper-parameter")?),
            4 => {
                let n = self.u32("a list length")?;
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                ParamValue::List(items)
            }
            5 => ParamValue::Map(self.map(depth + 1)?),
            other => return Err(corrupt(format!("unknown hyper-parameter tag {other}"))),
        })
    }
    fn map(&mut self, depth: usize) -> Result<BTreeMap<String, ParamValue>> {
        let n = self.u32("a map length")?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = self.str("a hyper-parameter name")?;
            let v = self.value(depth)?;
            m.insert(k, v);
        }
        Ok(m)
    }
    fn array(&mut self) -> Result<NDArray> {
        let code = self.u8("an array dtype")?;
        let dtype = dtype_of(code).ok_or_else(|| corrupt(format!("unknown dtype code {code}")))?;
        let ndim = self.u32("an array rank")?;
        if ndim > MAX_NDIM {
            return Err(corrupt(format!("array rank {ndim} exceeds {MAX_NDIM}")));
        }
        let mut shape = Vec::with_capacity(ndim as usize);
        let mut count: usize = 1;
        for _ in 0..ndim {
            let d = usize::try_from(self.u64("an array dimension")?)
                .map_err(|_| corrupt("array dimension too large"))?;
            count = count
                .checked_mul(d)
                .ok_or_else(|| corrupt("array size overflows"))?;
            shape.push(d);
        }
        let nbytes = count
            .checked_mul(dtype.size_of())
            .ok_or_else(|| corrupt("array size overflows"))?;
        let data = self.take(nbytes, "array data")?;
        macro_rules! get {
            ($t:ty, $n:expr) => {{
                let v: Vec<$t> = data
                    .chunks_exact($n)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk")))
                    .collect();
                NDArray::from_vec(&shape, v)?
            }};
        }
        Ok(match dtype {
            DType::F32 => get!(f32, 4),
            DType::F64 => get!(f64, 8),
            DType::F16 => get!(f16, 2),
            DType::BF16 => get!(bf16, 2),
            DType::I32 => get!(i32, 4),
            DType::I64 => get!(i64, 8),
            _ => get!(u8, 1),
        })
    }
}

/// Parses a state file, checking magic, version and checksum first.
pub(crate) fn decode(bytes: &[u8]) -> Result<Saved> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        let hint = if bytes.first() == Some(&0x80) {
            " (it looks like a Python pickle, e.g. MXNet's own optimizer states, which this format does not read)"
        } else {
            ""
        };
        return Err(Error::InvalidArgument(format!(
            "not an optimizer state file: it does not start with the magic bytes {:?}{hint}",
            String::from_utf8_lossy(MAGIC)
        )));
    }
    if bytes.len() < MAGIC.len() + 12 {
        return Err(corrupt(format!(
            "truncated: {} bytes, a state file has at least {}",
            bytes.len(),
            MAGIC.len() + 12
        )));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::InvalidArgument(format!(
            "optimizer state file format version {version} is not supported (this build reads version {VERSION})"
        )));
    }
    let (content, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    let actual = crc32(content);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {actual:#010x}): the file is truncated or damaged"
        )));
    }
    let mut r = Reader {
        bytes: content,
        pos: 12,
    };
    let flags = r.u32("the flags")?;
    if flags & !FLAG_OPTIMIZER != 0 {
        return Err(corrupt(format!("unknown flags {flags:#x}")));
    }
    let optimizer = if flags & FLAG_OPTIMIZER != 0 {
        let name = r.str("the optimizer name")?;
        let params = r.map(0)?;
        let runtime = r.map(0)?;
        Some(SavedOptimizer {
            spec: OptimizerSpec { name, params },
            runtime,
        })
    } else {
        None
    };
    let n = r.u64("the key count")?;
    let mut keys = Vec::new();
    for _ in 0..n {
        let key = match r.u8("a key tag")? {
            0 => Key::Int(r.u64("an int key")? as i64),
            1 => Key::from(r.str("a str key")?),
            other => return Err(corrupt(format!("unknown key tag {other}"))),
        };
        let count = if r.flag("an update count")? {
            // Counts are written from `i64`s; a larger one is damage, and would overflow
            // the next update's count.
            let count = r.u64("an update count")?;
            if count > i64::MAX as u64 {
                return Err(corrupt(format!(
                    "update count {count} of key {key} is out of range"
                )));
            }
            Some(count)
        } else {
            None
        };
        let master = if r.flag("a master weight")? {
            Some(r.array()?)
        } else {
            None
        };
        let k = r.u32("a state array count")?;
        let mut arrays = Vec::new();
        for _ in 0..k {
            arrays.push(r.array()?);
        }
        keys.push(SavedKey {
            key,
            count,
            master,
            arrays,
        });
    }
    if r.pos != content.len() {
        return Err(corrupt(format!(
            "{} unexpected bytes after the last key",
            content.len() - r.pos
        )));
    }
    Ok(Saved { optimizer, keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip() {
        let mut params = BTreeMap::new();
        params.insert("momentum".to_string(), ParamValue::Float(0.9));
        params.insert(
            "lr_mult".to_string(),
            ParamValue::Map(BTreeMap::from([("w".to_string(), ParamValue::Int(2))])),
        );
        let saved = Saved {
            optimizer: Some(SavedOptimizer {
                spec: OptimizerSpec {
                    name: "sgd".into(),
                    params,
                },
                runtime: BTreeMap::from([(
                    "x".to_string(),
                    ParamValue::List(vec![true.into(), "s".into()]),
                )]),
            }),
            keys: vec![
                SavedKey {
                    key: Key::from(-3),
                    count: Some(7),
                    master: Some(NDArray::ones(&[2], DType::F32)),
                    arrays: vec![NDArray::full(&[2, 1], 0.5, DType::F16)],
                },
                SavedKey {
                    key: Key::from("w"),
                    count: None,
                    master: None,
                    arrays: vec![],
                },
            ],
        };
        let bytes = encode(&saved).unwrap();
        assert_eq!(decode(&bytes).unwrap(), saved);
    }

    #[test]
    fn an_update_count_beyond_i64_is_refused() {
        let saved = |count| Saved {
            optimizer: None,
            keys: vec![SavedKey {
                key: Key::from(1),
                count: Some(count),
                master: None,
                arrays: vec![],
            }],
        };
        let largest = encode(&saved(i64::MAX as u64)).unwrap();
        assert_eq!(decode(&largest).unwrap(), saved(i64::MAX as u64));
        let e = decode(&encode(&saved(u64::MAX)).unwrap()).unwrap_err();
        assert!(e.to_string().contains("update count"), "{e}");
    }

    /// A file whose content was cut, extended or changed, with its checksum made right again
    /// (as a hostile sender would): decoding answers `Ok` or `Err`, never panics.
    #[test]
    fn damaged_files_with_a_valid_checksum_never_panic() {
        let saved = Saved {
            optimizer: Some(SavedOptimizer {
                spec: OptimizerSpec {
                    name: "adam".into(),
                    params: BTreeMap::from([("beta1".to_string(), ParamValue::Float(0.9))]),
                },
                runtime: BTreeMap::from([(
                    "nested".to_string(),
                    ParamValue::List(vec![ParamValue::Map(BTreeMap::new()), 3i64.into()]),
                )]),
            }),
            keys: vec![SavedKey {
                key: Key::from("w"),
                count: Some(2),
                master: Some(NDArray::ones(&[3], DType::F32)),
                arrays: vec![NDArray::full(&[3, 1], 0.5, DType::F64)],
            }],
        };
        let valid = encode(&saved).unwrap();
        let mut rng = kvstore_test::fuzz::Rng::new(0xD1B5_4A32_D192_ED03);
        for _ in 0..20_000 {
            let mut content = valid[..valid.len() - 4].to_vec();
            for _ in 0..1 + rng.below(3) {
                let header = 12; // magic and version stay, or nothing past them is read
                match rng.below(3) {
                    0 => {
                        let at = header + rng.below((content.len() - header) as u64) as usize;
                        let any = rng.next() as u8;
                        content[at] = rng.pick(&[0u8, 0xFF, 0x7F, 0x80, any]);
                    }
                    1 => {
                        let keep = header + rng.below((content.len() - header + 1) as u64) as usize;
                        content.truncate(keep);
                    }
                    _ => {
                        let n = rng.below(24) as usize;
                        content.extend(rng.bytes(n));
                    }
                }
                if content.len() <= header {
                    content = valid[..valid.len() - 4].to_vec();
                }
            }
            let crc = crc32(&content);
            content.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&content);
        }
    }
}

//! [`CompressionSpec`]: the compression a store was asked for, from MXNet's parameter map or
//! from MXNet's wire text.

use std::fmt;

use kvstore_base::{CompressionParams, Error, Result};

use crate::Codec;

/// The kind of gradient compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionType {
    /// `"2bit"`: each element becomes `+threshold`, `-threshold` or `0` (2 bits, 16 per
    /// 32-bit word).
    TwoBit,
    /// `"1bit"` (MXNet 2.x): each element becomes `+1` or `-1` (1 bit, 32 per 32-bit word).
    OneBit,
}

impl CompressionType {
    /// The name MXNet's `type` parameter uses: `"2bit"` or `"1bit"`.
    pub const fn name(self) -> &'static str {
        match self {
            CompressionType::TwoBit => "2bit",
            CompressionType::OneBit => "1bit",
        }
    }

    /// How many gradient elements share one 32-bit word of the compressed form: 16 for
    /// 2-bit, 32 for 1-bit (MXNet's `GetCompressionFactor()`).
    pub const fn factor(self) -> usize {
        match self {
            CompressionType::TwoBit => 16,
            CompressionType::OneBit => 32,
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which numbering of the compression type the wire text uses.
///
/// MXNet sends a store's compression to its servers as text, `"<type code>,<threshold>"`
/// (`GradientCompression::EncodeParams()`), and the codes changed between versions:
///
/// | type | MXNet 1.x (1.9.1) | MXNet 2.x |
/// |---|---|---|
/// | none | `0` | `0` |
/// | 1-bit | (does not exist; `2` here) | `1` |
/// | 2-bit | `1` | `2` |
///
/// So `"1,0.500000"` is 2-bit compression to a 1.9.1 server and 1-bit compression to a 2.x
/// one. This crate follows MXNet 1.9.1 by default ([`TypeCodes::Mxnet1`]). MXNet 1.9.1 has no
/// 1-bit compression; in the 1.x numbering this crate writes it as `2`, a code that 1.9.1
/// servers do not know (their first compressed push fails with `Unsupported dequantization of
/// type 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TypeCodes {
    /// MXNet 1.x: `1` = 2-bit (and `2` = 1-bit, an extension of this crate).
    #[default]
    Mxnet1,
    /// MXNet 2.x: `1` = 1-bit, `2` = 2-bit.
    Mxnet2,
}

impl TypeCodes {
    fn code(self, kind: CompressionType) -> u32 {
        match (self, kind) {
            (TypeCodes::Mxnet1, CompressionType::TwoBit) => 1,
            (TypeCodes::Mxnet1, CompressionType::OneBit) => 2,
            (TypeCodes::Mxnet2, CompressionType::OneBit) => 1,
            (TypeCodes::Mxnet2, CompressionType::TwoBit) => 2,
        }
    }

    fn kind(self, code: i64) -> Option<CompressionType> {
        match (self, code) {
            (TypeCodes::Mxnet1, 1) | (TypeCodes::Mxnet2, 2) => Some(CompressionType::TwoBit),
            (TypeCodes::Mxnet1, 2) | (TypeCodes::Mxnet2, 1) => Some(CompressionType::OneBit),
            _ => None,
        }
    }
}

/// A gradient compression setting: the type and the threshold.
///
/// Built from the parameters of `set_gradient_compression` with [`from_params`], exactly as
/// MXNet parses them, or from the text a worker sends to the servers with [`decode_params`].
/// [`codec`] gives the [`Codec`] that quantises and dequantises with it.
///
/// ```
/// use kvstore_base::CompressionParams;
/// use kvstore_compression::{CompressionSpec, CompressionType};
///
/// let params = CompressionParams::from([("type".to_string(), "2bit".to_string())]);
/// let spec = CompressionSpec::from_params(&params).unwrap();
/// assert_eq!(spec.kind, CompressionType::TwoBit);
/// assert_eq!(spec.threshold, 0.5); // MXNet's default
///
/// // What a worker sends to the servers (MXNet 1.9.1's text), and back.
/// assert_eq!(spec.encode_params(), "1,0.500000");
/// assert_eq!(CompressionSpec::decode_params("1,0.500000").unwrap(), spec);
/// ```
///
/// [`from_params`]: CompressionSpec::from_params
/// [`decode_params`]: CompressionSpec::decode_params
/// [`codec`]: CompressionSpec::codec
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressionSpec {
    /// 2-bit or 1-bit.
    pub kind: CompressionType,
    /// The threshold: the magnitude of the 2-bit values, the decision point of the 1-bit code.
    pub threshold: f32,
}

/// MXNet's default threshold (`GradientCompressionParam::threshold`).
pub const DEFAULT_THRESHOLD: f32 = 0.5;

impl CompressionSpec {
    /// 2-bit compression with `threshold`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `threshold > 0` (`threshold must be greater than 0`).
    pub fn two_bit(threshold: f32) -> Result<Self> {
        check_two_bit(threshold)?;
        Ok(CompressionSpec {
            kind: CompressionType::TwoBit,
            threshold,
        })
    }

    /// 1-bit compression with `threshold` (any value, as MXNet 2.x accepts: its tests use
    /// `-0.5`, `0` and `0.5`).
    pub fn one_bit(threshold: f32) -> Self {
        CompressionSpec {
            kind: CompressionType::OneBit,
            threshold,
        }
    }

    /// Parses the parameters of `set_gradient_compression` as MXNet does:
    ///
    /// - `type` is required (`Required parameter type of string is not presented`) and is
    ///   compared exactly: `"2bit"` or `"1bit"`; anything else is `Unknown type for gradient
    ///   compression <type>`.
    /// - `threshold` defaults to 0.5 and is parsed by the same algorithm as MXNet's parameter
    ///   parser (dmlc-core's `stof`), so a text gives the same `f32` as in MXNet, bit for bit:
    ///   leading whitespace skipped, `inf`/`infinity`/`nan` in any case, at most 19 fraction
    ///   digits, an optional `f` suffix, and MXNet's messages for the rest (`Invalid Parameter
    ///   format for threshold expect float but value='...'`, `Out of range value for threshold,
    ///   value='...'`, `Some trailing characters could not be parsed: '...'`). A finite text
    ///   whose scaling overflows (`"3.4028235e38"`) is out of range here; MXNet's answer for
    ///   it depends on a stale `errno`.
    /// - `2bit` needs `threshold > 0` (`threshold must be greater than 0`); `1bit` takes any
    ///   threshold.
    /// - Other keys are ignored, as MXNet does.
    ///
    /// This follows MXNet 2.x's checks (MXNet 1.9.1 rejects `1bit`, and checks
    /// `threshold > 0` before looking at the type, so `{"type": "3bit", "threshold": "-1"}`
    /// is a threshold error there and an unknown type here).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] with the messages above.
    pub fn from_params(params: &CompressionParams) -> Result<Self> {
        // dmlc parses the given fields in order ("threshold" before "type" in a sorted
        // map), then reports missing required ones.
        let threshold = match params.get("threshold") {
            Some(text) => parse_threshold(text)?,
            None => DEFAULT_THRESHOLD,
        };
        let Some(kind) = params.get("type") else {
            return Err(Error::InvalidArgument(
                "Required parameter type of string is not presented".into(),
            ));
        };
        match kind.as_str() {
            "2bit" => CompressionSpec::two_bit(threshold),
            "1bit" => Ok(CompressionSpec::one_bit(threshold)),
            other => Err(Error::InvalidArgument(format!(
                "Unknown type for gradient compression {other}"
            ))),
        }
    }

    /// MXNet's wire text for this setting in MXNet 1.9.1's numbering (see [`TypeCodes`]):
    /// `"1,0.500000"` for 2-bit with threshold 0.5. This is the body of the
    /// `kSetGradientCompression` command a worker sends to the servers.
    ///
    /// The threshold is written as C's `%f` (`std::to_string`): 6 decimals, so a receiver
    /// gets the threshold rounded to 6 decimals, as MXNet's servers do (`1/3` becomes
    /// `0.333333`; any threshold below `5e-7` becomes `0`, and such a server dequantises to
    /// `±0`).
    pub fn encode_params(&self) -> String {
        self.encode_params_as(TypeCodes::Mxnet1)
    }

    /// [`encode_params`](Self::encode_params) with the type numbering of `codes`.
    pub fn encode_params_as(&self, codes: TypeCodes) -> String {
        format!("{},{}", codes.code(self.kind), c_fixed6(self.threshold))
    }

    /// Reads MXNet's wire text in MXNet 1.9.1's numbering (see [`TypeCodes`]).
    ///
    /// # Errors
    /// See [`decode_params_as`](Self::decode_params_as).
    pub fn decode_params(text: &str) -> Result<Self> {
        Self::decode_params_as(text, TypeCodes::Mxnet1)
    }

    /// Reads MXNet's wire text, `"<type code>[,<threshold>]"`, as MXNet's `DecodeParams`
    /// does: the code is the leading integer of the first field (leading whitespace and a sign
    /// allowed, trailing characters ignored, as `std::stoi`), the threshold the second field
    /// when present and not empty (surrounding whitespace allowed), `0` otherwise (MXNet's
    /// initial value). The threshold is not checked, as in MXNet: a 2-bit threshold that the
    /// 6-decimal text rounded to `0` stays `0`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the code is missing or not a compression type of
    /// `codes` (`0`, no compression, cannot be set: compression cannot be turned off), or when
    /// the threshold is not a number.
    pub fn decode_params_as(text: &str, codes: TypeCodes) -> Result<Self> {
        let mut fields = text.split(',');
        let first = fields.next().unwrap_or("");
        let code = leading_int(first).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "gradient compression parameters '{text}': no type code"
            ))
        })?;
        let kind = codes.kind(code).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "gradient compression parameters '{text}': type code {code} is not a compression \
                 type in the {codes:?} numbering"
            ))
        })?;
        let threshold = match fields.next() {
            Some(t) if !t.is_empty() => t.trim().parse::<f32>().map_err(|_| {
                Error::InvalidArgument(format!(
                    "gradient compression parameters '{text}': threshold '{t}' is not a number"
                ))
            })?,
            _ => 0.0,
        };
        Ok(CompressionSpec { kind, threshold })
    }

    /// The codec that quantises and dequantises with this setting.
    pub fn codec(&self) -> Codec {
        Codec::new(self.kind, self.threshold)
    }
}

fn check_two_bit(threshold: f32) -> Result<()> {
    // `!(t > 0)` so that NaN is refused too, as MXNet's CHECK_GT.
    if threshold > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "threshold must be greater than 0 for 2bit compression (got {threshold})"
        )))
    }
}

/// `std::to_string(float)`: `%f` of the value promoted to double.
fn c_fixed6(x: f32) -> String {
    if x.is_nan() {
        if x.is_sign_negative() { "-nan" } else { "nan" }.to_string()
    } else if x.is_infinite() {
        if x < 0.0 { "-inf" } else { "inf" }.to_string()
    } else {
        format!("{:.6}", f64::from(x))
    }
}

/// `std::stoi`'s value: leading whitespace, an optional sign, digits; the rest ignored.
fn leading_int(s: &str) -> Option<i64> {
    let s = s.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    let value: i64 = digits[..end].parse().ok()?;
    Some(if neg { -value } else { value })
}

/// Parses a threshold as MXNet's parameter parser does, with its error messages.
fn parse_threshold(text: &str) -> Result<f32> {
    match dmlc_stof(text) {
        Ok(v) => Ok(v),
        Err(StofError::Invalid) => Err(Error::InvalidArgument(format!(
            "Invalid Parameter format for threshold expect float but value='{text}'"
        ))),
        Err(StofError::OutOfRange) => Err(Error::InvalidArgument(format!(
            "Out of range value for threshold, value='{text}'"
        ))),
        Err(StofError::Trailing(pos)) => Err(Error::InvalidArgument(format!(
            "Some trailing characters could not be parsed: '{}'",
            &text[pos..]
        ))),
        Err(StofError::NanLiteral) => Err(Error::InvalidArgument(format!(
            "Invalid NAN literal for threshold, value='{text}'"
        ))),
    }
}

#[derive(Debug, PartialEq)]
enum StofError {
    /// Nothing could be read.
    Invalid,
    /// The exponent is out of `f32`'s range, or the value overflowed.
    OutOfRange,
    /// A number was read, followed by other characters (byte offset of the rest).
    Trailing(usize),
    /// `nan(` without its closing parenthesis.
    NanLiteral,
}

/// dmlc-core's `stof` (`ParseFloat<float, CheckRange = true>`), the float parser of MXNet's
/// parameters, step for step, so that a text gives the same `f32` as in MXNet. It is not a
/// correctly rounded parser: the integer part is read into a wrapping `u64`, at most 19
/// fraction digits are read and added as `(f32)((f64)digits / (f64)10^k)`, and exponents
/// scale by repeated `f32` multiplications (`1e8`, then `10`).
fn dmlc_stof(text: &str) -> std::result::Result<f32, StofError> {
    const MAX_EXPONENT: u32 = 38;
    let max_significand = 3.402_823_466_f64 as f32;
    let max_neg_significand = 1.175_494_351_f64 as f32;
    let b = text.as_bytes();
    // C strings end with a NUL: reading past the end gives 0.
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut p = 0;
    while matches!(at(p), b' ' | b'\t' | b'\r' | b'\n' | 0x0c) {
        p += 1;
    }
    let mut positive = true;
    match at(p) {
        b'-' => {
            positive = false;
            p += 1;
        }
        b'+' => p += 1,
        _ => {}
    }
    let finish = |value: f32, p: usize| {
        if p == 0 {
            Err(StofError::Invalid)
        } else if p < b.len() {
            Err(StofError::Trailing(p))
        } else {
            Ok(value)
        }
    };
    // "inf" / "infinity", any case.
    let mut i = 0;
    while i < 8 && (at(p + i) | 32) == b"infinity"[i] {
        i += 1;
    }
    if i == 3 || i == 8 {
        let inf = if positive {
            f32::INFINITY
        } else {
            f32::NEG_INFINITY
        };
        return finish(inf, p + i);
    }
    // "nan" / "nan(chars)", any case; the sign is not applied.
    let mut i = 0;
    while i < 3 && (at(p + i) | 32) == b"nan"[i] {
        i += 1;
    }
    if i == 3 {
        p += 3;
        if at(p) == b'(' {
            p += 1;
            while at(p).is_ascii_alphanumeric() || at(p) == b'_' {
                p += 1;
            }
            if at(p) != b')' {
                return Err(StofError::NanLiteral);
            }
            p += 1;
        }
        return finish(f32::NAN, p);
    }
    let mut predec: u64 = 0;
    while at(p).is_ascii_digit() {
        predec = predec
            .wrapping_mul(10)
            .wrapping_add(u64::from(at(p) - b'0'));
        p += 1;
    }
    let mut value = predec as f32;
    if at(p) == b'.' {
        let mut pow10: u64 = 1;
        let mut val2: u64 = 0;
        let mut digits = 0;
        p += 1;
        while at(p).is_ascii_digit() {
            if digits < 19 {
                val2 = val2 * 10 + u64::from(at(p) - b'0');
                pow10 *= 10;
            }
            p += 1;
            digits += 1;
        }
        value += (val2 as f64 / pow10 as f64) as f32;
    }
    if at(p) == b'e' || at(p) == b'E' {
        p += 1;
        let mut frac = false;
        match at(p) {
            b'-' => {
                frac = true;
                p += 1;
            }
            b'+' => p += 1,
            _ => {}
        }
        let mut expon: u32 = 0;
        while at(p).is_ascii_digit() {
            expon = expon.wrapping_mul(10).wrapping_add(u32::from(at(p) - b'0'));
            p += 1;
        }
        if expon > MAX_EXPONENT
            || (expon == MAX_EXPONENT
                && ((!frac && value > max_significand) || (frac && value < max_neg_significand)))
        {
            return Err(StofError::OutOfRange);
        }
        let mut scale = 1.0f32;
        while expon >= 8 {
            scale *= 1e8;
            expon -= 8;
        }
        while expon > 0 {
            scale *= 10.0;
            expon -= 1;
        }
        value = if frac { value / scale } else { value * scale };
    }
    if at(p) == b'f' || at(p) == b'F' {
        p += 1;
    }
    if value.is_infinite() {
        // Only a finite text gets here: its scaling overflowed.
        return Err(StofError::OutOfRange);
    }
    finish(if positive { value } else { -value }, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stof_follows_dmlc() {
        assert_eq!(dmlc_stof("0.5"), Ok(0.5));
        assert_eq!(dmlc_stof(" \t.5f"), Ok(0.5));
        assert_eq!(dmlc_stof("1e"), Ok(1.0));
        assert_eq!(dmlc_stof("-"), Ok(-0.0));
        assert_eq!(dmlc_stof(""), Err(StofError::Invalid));
        assert_eq!(dmlc_stof("infinit"), Err(StofError::Invalid));
        assert_eq!(dmlc_stof("0.5x"), Err(StofError::Trailing(3)));
        assert_eq!(dmlc_stof("1e39"), Err(StofError::OutOfRange));
        assert_eq!(dmlc_stof("3.4028235e38"), Err(StofError::OutOfRange));
        assert_eq!(dmlc_stof("nan("), Err(StofError::NanLiteral));
        assert!(dmlc_stof("-NaN(x_1)").unwrap().is_nan());
        assert_eq!(dmlc_stof("-Infinity"), Ok(f32::NEG_INFINITY));
    }

    #[test]
    fn stoi_prefix() {
        assert_eq!(leading_int(" 1abc"), Some(1));
        assert_eq!(leading_int("-2"), Some(-2));
        assert_eq!(leading_int("x"), None);
    }

    #[test]
    fn fixed6_as_c() {
        assert_eq!(c_fixed6(0.5), "0.500000");
        assert_eq!(c_fixed6(1e-10), "0.000000");
        assert_eq!(c_fixed6(0.007_812_5), "0.007812");
        assert_eq!(c_fixed6(f32::NEG_INFINITY), "-inf");
    }
}

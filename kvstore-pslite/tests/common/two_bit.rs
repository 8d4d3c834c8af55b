//! MXNet's 2-bit rule written out, in Rust and in Python, for the tests to predict what a
//! compressed job sums.

/// What a worker sends for `grad`: the residual takes the gradient; `+t` is sent when it
/// reaches `t`, `-t` when it reaches `-t`, else `0`; what is sent leaves the residual.
pub fn sent(grad: &[f32], residual: &mut [f32], t: f32) -> Vec<f32> {
    grad.iter()
        .zip(residual.iter_mut())
        .map(|(g, r)| {
            *r += g;
            if *r >= t {
                *r -= t;
                t
            } else if *r <= -t {
                *r += t;
                -t
            } else {
                0.0
            }
        })
        .collect()
}

/// [`sent`] in Python (numpy, float32).
pub const PYTHON_SENT: &str = "
def sent(grad, residual, t):
    residual += grad
    out = np.where(residual >= t, t, np.where(residual <= -t, -t, 0)).astype(np.float32)
    residual -= out
    return out
";

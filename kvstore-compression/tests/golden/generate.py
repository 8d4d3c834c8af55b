"""Generates compression.json: MXNet 1.9.1's own 2-bit gradient compression, observed.

Run with MXNet 1.9.1 installed (pip install mxnet==1.9.1 numpy==1.23.5) and `strace` on the
PATH (Linux; ptrace must be allowed):

    python3 generate.py      # writes compression.json next to this script

MXNet 1.9.1 has no operator for its compression kernels (nothing in mx.nd.contrib or
mx.nd._internal), so the vectors are observed through the two kvstores that run them:

* "dequantized" values: a `device` kvstore on CPU contexts, with
  set_gradient_compression({'type': '2bit', 'threshold': t}) and no updater. Every push is
  quantised against the store's per-(key, device) residual and dequantised again before the
  sum, so a pull returns the last push's dequantised value (the sum over devices for a push
  from several devices). One key per case, one push and one pull per round, so the residual
  carries from round to round.

* "packed" bytes: a `dist_sync` job on 127.0.0.1 (one scheduler, one server, one worker, no
  updater) pushing the same gradients. The worker quantises each push and sends the packed
  words to the server; the generator runs the worker under `strace -ff -e trace=sendto` and
  reads the ZMQ (ZMTP 3) frames the worker wrote to the server: a compressed push is the
  message [meta, keys = (original size, key) as u64, vals = the packed words, lens]. The same
  trace gives the body of the kSetGradientCompression command (MXNet's EncodeParams() text,
  "1,0.500000"). The pulls of the job (the server dequantises with the threshold it decoded from
  that text) are checked here to equal the device store's values, and are stored for the
  thresholds that the 6-decimal text does not carry exactly ("dist_pulled").

* "params": set_gradient_compression() on a `device` kvstore with each parameter map, as
  strings; the result is the error text or, when accepted, the threshold in effect (read back
  by pushing +inf to a one-element key: inf >= t, so the pull returns +t).

1-bit compression does not exist in MXNet 1.9.1 (it rejects {'type': '1bit'}; it is an MXNet
2.x feature), so the "one_bit" section is NOT produced by MXNet: it comes from `compute_1bit`
below, a re-implementation of the simulator of MXNet 2.x's nightly test
(tests/nightly/test_kvstore.py: compute_1bit + compute_expected_quantization) with two
corrections so that it describes the 2.x C++ kernel: arithmetic in float32 (the nightly
simulator adds a float64 residual) and exactly ceil(n/32) words of output (the simulator pads
a length that is a multiple of 32, other than 32 itself, with one extra word).

Arrays are stored as hex strings of their little-endian memory bytes: float32 arrays
("f32le", 8 hex digits per element, so NaN, infinities and -0.0 survive) and packed outputs
(2 hex digits per byte).
"""
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROUNDS = 6
THRESHOLDS = [0.5, 0.25, 1.0, 1e-6, 0.1]
ALL_LENGTHS = [1, 5, 15, 16, 17, 31, 33, 1000]
SOME_LENGTHS = [5, 17, 33]
# Thresholds whose 6-decimal wire text ("%f") is not the threshold itself: the server of a
# dist job dequantises with the decoded value.
WIRE_ONLY_THRESHOLDS = [1.0 / 3.0, 1e-10]

ONE_BIT_THRESHOLDS = [-0.5, 0.0, 0.5, 1.0]
ONE_BIT_LENGTHS = [1, 5, 31, 32, 33, 64]
ONE_BIT_LONG = 200  # one longer case per threshold

PARAMS = [
    {},
    {"threshold": "0.5"},
    {"type": "2bit"},
    {"type": "2bit", "threshold": "0.25"},
    {"type": "2bit", "threshold": "0.5", "Threshold": "2", "foo": "1"},
    {"type": "3bit"},
    {"type": "1bit"},
    {"type": "1bit", "threshold": "-0.5"},
    {"type": "2BIT"},
    {"type": "3bit", "threshold": "-1"},
    {"type": "1bit", "threshold": "abc"},
] + [{"type": "2bit", "threshold": t} for t in [
    "-1", "0", "-0", "0.0", "-0.0000", "0e5", "abc", "", "nan", "NaN", "inf", "INF",
    "Infinity", "-inf", "infinit", " 0.5", "\t0.25", "0.5 ", "+0.5", ".5", "00.5", "5e-1",
    "1e-3", "1E2", "1e+2", "0.1", "0.3333333", "123.456e-2", "1e-7", "1e-10", "0.5x", "1,5",
    "1 2", "0x1p-1", "1.17549435e-38", "3e38", "0.50000000000000000001",
    "12345678901234567890123", ".", "-", "e5", "1e", "0.1f", "nan(abc)", "nan(",
    # Out of range, last: dmlc::stof reports "out of range" when the parse returns +inf and
    # errno is ERANGE, without clearing errno first, so an +inf parsed after one of these
    # (e.g. "3.4028235e38", whose scaling overflows) depends on what ran before.
    "1e-50", "1e50", "1e-40", "1e-38", "1.1754942e-38", "1e-45",
]]


def f32le(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def f32_bits(x):
    return "%08x" % struct.unpack("<I", struct.pack("<f", x))[0]


# ---------------------------------------------------------------------------------------
# Gradients


def random_grads(rs, n, t, kind):
    """ROUNDS float32 gradients of length n, scaled to the threshold."""
    if kind == "same":  # one gradient pushed every round: the residual does the work
        g = (rs.uniform(-0.7, 0.7, n) * t).astype(np.float32)
        return [g.copy() for _ in range(ROUNDS)]
    if kind == "changing":
        return [(rs.uniform(-1.5, 1.5, n) * t).astype(np.float32) for _ in range(ROUNDS)]
    if kind == "small":  # many rounds before a code fires
        return [(rs.uniform(-0.3, 0.3, n) * t).astype(np.float32) for _ in range(ROUNDS)]
    raise ValueError(kind)


def special_grads(t, rounds=ROUNDS):
    """Values at and around the threshold, zeros of both signs, NaN and infinities."""
    t = np.float32(t)
    below = np.nextafter(t, np.float32(0))
    above = np.nextafter(t, np.float32(np.inf))
    g = np.array([t, -t, t / 2, -t / 2, below, -below, above, -above, 0.0, -0.0,
                  np.nan, np.inf, -np.inf, 2 * t, -2 * t, 0.75 * t, -0.75 * t, 1e30, -1e30,
                  1e-45, -1e-45, 3 * t], dtype=np.float32)
    return [g.copy() for _ in range(rounds)]


def two_bit_cases():
    cases = []
    seed = 0
    for t in THRESHOLDS:
        lengths = ALL_LENGTHS if t == 0.5 else SOME_LENGTHS
        for n in lengths:
            for kind in (("same", "changing") if n < 1000 else ("changing",)):
                seed += 1
                rs = np.random.RandomState(seed)
                cases.append({"threshold": t, "kind": kind,
                              "grads": random_grads(rs, n, t, kind)})
        seed += 1
        rs = np.random.RandomState(seed)
        n = 200 if t == 1e-6 else 33
        cases.append({"threshold": t, "kind": "small", "grads": random_grads(rs, n, t, "small")})
        cases.append({"threshold": t, "kind": "special", "grads": special_grads(t)})
    # the wire-capture example of the spec: +0.6, -0.6, 0.1 repeating, t = 0.5
    g = np.array([0.6, -0.6, 0.1] * 7, dtype=np.float32)[:20]
    cases.append({"threshold": 0.5, "kind": "spec_wire", "grads": [g.copy() for _ in range(ROUNDS)]})
    # the residual example of the spec
    g = np.array([0.4, 0.6, -0.7, 0.1, -0.3], dtype=np.float32)
    cases.append({"threshold": 0.5, "kind": "spec_residual", "grads": [g.copy() for _ in range(ROUNDS)]})
    for t in WIRE_ONLY_THRESHOLDS:
        seed += 1
        rs = np.random.RandomState(seed)
        cases.append({"threshold": t, "kind": "changing", "grads": random_grads(rs, 40, t, "changing")})
    return cases


def device_cases():
    cases = []
    seed = 500
    for t, devices, n in [(0.5, 2, 33), (0.5, 4, 33), (0.1, 4, 37), (0.3, 3, 100)]:
        seed += 1
        rs = np.random.RandomState(seed)
        grads = [[(rs.uniform(-1.0, 1.0, n) * t).astype(np.float32) for _ in range(devices)]
                 for _ in range(ROUNDS)]
        cases.append({"threshold": t, "devices": devices, "grads": grads})
    return cases


# ---------------------------------------------------------------------------------------
# MXNet: device store


def run_device_store(mx, threshold, cases):
    """Per case, per round: the pulled (dequantised) value of a device store."""
    kv = mx.kv.create("device")
    kv.set_gradient_compression({"type": "2bit", "threshold": threshold})
    out = []
    for key, case in enumerate(cases):
        per_round = case["grads"]
        multi = isinstance(per_round[0], list)
        n = len(per_round[0][0]) if multi else len(per_round[0])
        kv.init(key, mx.nd.zeros((n,), ctx=mx.cpu(0)))
        pulled = []
        for g in per_round:
            if multi:
                kv.push(key, [mx.nd.array(gd, ctx=mx.cpu(d), dtype="float32")
                              for d, gd in enumerate(g)])
            else:
                kv.push(key, mx.nd.array(g, ctx=mx.cpu(0), dtype="float32"))
            o = mx.nd.zeros((n,), ctx=mx.cpu(0))
            kv.pull(key, out=o)
            pulled.append(o.asnumpy().astype(np.float32))
        out.append(pulled)
    return out


def mxnet_error_text(e):
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msgs = [l for l in lines if l.startswith("MXNetError:")]
    text = (msgs or lines or [type(e).__name__])[-1]
    if text.startswith("MXNetError:"):
        text = text[len("MXNetError:"):].strip()
    # "[12:34:56] ../include/dmlc/./strtonum.h:164: " (a CHECK outside the parameter parser)
    return re.sub(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)


def run_params(mx):
    out = []
    for params in PARAMS:
        kv = mx.kv.create("device")
        case = {"params": params}
        try:
            kv.set_gradient_compression(params)
        except Exception as e:  # pylint: disable=broad-except
            case["mxnet_error"] = mxnet_error_text(e)
            out.append(case)
            continue
        kv.init(0, mx.nd.zeros((1,), ctx=mx.cpu(0)))
        kv.push(0, mx.nd.array([np.inf], ctx=mx.cpu(0), dtype="float32"))
        o = mx.nd.zeros((1,), ctx=mx.cpu(0))
        kv.pull(0, out=o)
        case["threshold_f32"] = f32_bits(float(o.asnumpy()[0]))
        out.append(case)
    return out


# ---------------------------------------------------------------------------------------
# MXNet: dist_sync job under strace

WORKER = r"""
import json, sys
import numpy as np
import mxnet as mx
spec = json.load(open(sys.argv[1]))
kv = mx.kv.create('dist_sync')
kv.set_gradient_compression({'type': '2bit', 'threshold': spec['threshold']})
result = []
for key, grads in enumerate(spec['cases']):
    grads = [np.frombuffer(bytes.fromhex(g), dtype='<f4') for g in grads]
    n = len(grads[0])
    kv.init(key, mx.nd.zeros((n,)))
    pulled = []
    for g in grads:
        kv.push(key, mx.nd.array(g, dtype='float32'))
        o = mx.nd.zeros((n,))
        kv.pull(key, out=o)
        pulled.append(o.asnumpy().astype('<f4').tobytes().hex())
    result.append(pulled)
json.dump(result, open(sys.argv[2], 'w'))
"""

SENDTO = re.compile(r'^sendto\((\d+), "((?:\\x[0-9a-f]{2})*)"(?:\.\.\.)?, (\d+),.*\)\s*= (\d+)$')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zmtp_messages(stream):
    """Messages (lists of frame bodies) of one ZMTP 3 byte stream, commands skipped."""
    if len(stream) < 64 or stream[0] != 0xFF:
        return []
    pos, msgs, cur = 64, [], []
    while pos < len(stream):
        flags = stream[pos]
        if flags & 0x02:
            size = struct.unpack(">Q", stream[pos + 1:pos + 9])[0]
            pos += 9
        else:
            size = stream[pos + 1]
            pos += 2
        body = stream[pos:pos + size]
        if len(body) != size:
            raise RuntimeError("truncated ZMTP frame in the trace")
        pos += size
        if flags & 0x04:  # command (READY, ...)
            continue
        cur.append(body)
        if not flags & 0x01:
            msgs.append(cur)
            cur = []
    return msgs


def protobuf_fields(buf):
    """Top-level (field number, value) pairs of a protobuf message (varints and bytes)."""
    pos, out = 0, []
    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while pos < len(buf):
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            out.append((field, varint()))
        elif wire == 2:
            size = varint()
            out.append((field, buf[pos:pos + size]))
            pos += size
        elif wire == 5:
            out.append((field, buf[pos:pos + 4]))
            pos += 4
        elif wire == 1:
            out.append((field, buf[pos:pos + 8]))
            pos += 8
        else:
            raise RuntimeError("unexpected protobuf wire type %d" % wire)
    return out


def run_dist_job(threshold, cases):
    """(EncodeParams text, per case per round packed bytes, per case per round pulls)."""
    python = sys.executable
    tmp = tempfile.mkdtemp(prefix="kvstore-gc-")
    try:
        spec_path = os.path.join(tmp, "spec.json")
        out_path = os.path.join(tmp, "out.json")
        worker_path = os.path.join(tmp, "worker.py")
        with open(worker_path, "w") as f:
            f.write(WORKER)
        with open(spec_path, "w") as f:
            json.dump({"threshold": threshold,
                       "cases": [[f32le(g) for g in c["grads"]] for c in cases]}, f)
        env = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(free_port()),
                   DMLC_NUM_SERVER="1", DMLC_NUM_WORKER="1", DMLC_NODE_HOST="127.0.0.1")
        procs = [subprocess.Popen(["timeout", "300", python, "-c", "import mxnet"],
                                  env=dict(env, DMLC_ROLE=role))
                 for role in ("scheduler", "server")]
        trace = os.path.join(tmp, "trace")
        worker = subprocess.run(
            ["timeout", "300", "strace", "-ff", "-e", "trace=sendto", "-s", "10000000", "-xx",
             "-o", trace, python, worker_path, spec_path, out_path],
            env=dict(env, DMLC_ROLE="worker"))
        for p in procs:
            p.wait()
        if worker.returncode != 0 or any(p.returncode != 0 for p in procs):
            raise RuntimeError("dist job failed (threshold %r)" % threshold)
        with open(out_path) as f:
            pulled = json.load(f)
        # Per (thread, fd) byte streams of everything the worker sent, one per connection.
        streams = {}
        for name in sorted(os.listdir(tmp)):
            if not name.startswith("trace."):
                continue
            with open(os.path.join(tmp, name)) as f:
                for line in f:
                    m = SENDTO.match(line.strip())
                    if not m:
                        if re.match(r'sendto\(\d+, "', line):
                            raise RuntimeError("unparsed strace line: " + line[:200])
                        continue
                    data = bytes.fromhex(m.group(2).replace("\\x", ""))
                    if len(data) != int(m.group(3)):
                        raise RuntimeError("strace truncated a buffer")
                    sent = int(m.group(4))
                    key = (name, m.group(1))
                    # a descriptor reused for a new connection starts with a new greeting
                    # (signature 0xFF, 8 bytes, 0x7F)
                    if data[:1] == b"\xff" and len(data) >= 10 and data[9] == 0x7F:
                        streams.setdefault(key, []).append(bytearray())
                    streams.setdefault(key, [bytearray()])[-1].extend(data[:sent])
        encoded, packed = [], {}
        for stream in (s for per_fd in streams.values() for s in per_fd):
            for msg in zmtp_messages(bytes(stream)):
                meta = dict(protobuf_fields(msg[0]))
                if meta.get(1) == 4 and 2 in meta:  # head kSetGradientCompression, body
                    encoded.append(meta[2].decode())
                if len(msg) == 4 and len(msg[1]) == 16:  # compressed push: keys (size, key)
                    size, key = struct.unpack("<QQ", msg[1])
                    packed.setdefault(key, []).append((size, msg[2].hex()))
        if len(set(encoded)) != 1:
            raise RuntimeError("expected one kSetGradientCompression body, got %r" % encoded)
        rounds = []
        for key, case in enumerate(cases):
            got = packed.get(key, [])
            n = len(case["grads"][0])
            if len(got) != len(case["grads"]) or any(size != n for size, _ in got):
                raise RuntimeError("key %d: expected %d pushes of %d values, got %r"
                                   % (key, len(case["grads"]), n, got))
            rounds.append([h for _, h in got])
        return encoded[0], rounds, pulled
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Simulators (float32). compute_2bit only checks the observations; compute_1bit produces the
# one_bit section (NOT produced by MXNet).


def pack_bits(bits):
    """MXNet's layout: codes in element order, the first element of a byte in its most
    significant bits, zero bits up to whole 32-bit words (ceil(n / 16) words for 2-bit codes,
    ceil(n / 32) for 1-bit codes)."""
    s = "".join(bits)
    s += "0" * (-len(s) % 32)
    return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))


def compute_2bit(g, residual, t):
    t = np.float32(t)
    bits, deq = [], []
    for i in range(len(g)):
        r = np.float32(residual[i] + g[i])
        if r >= t:
            bits.append("11")
            r = np.float32(r - t)
            deq.append(t)
        elif r <= -t:
            bits.append("10")
            r = np.float32(r - (-t))
            deq.append(-t)
        else:
            bits.append("00")
            deq.append(np.float32(0))
        residual[i] = r
    return pack_bits(bits), np.array(deq, dtype=np.float32)


def compute_1bit(g, residual, t):
    """MXNet 2.x's nightly compute_1bit in float32 (see the module docstring)."""
    t = np.float32(t)
    one = np.float32(1)
    bits, deq = [], []
    for i in range(len(g)):
        r = np.float32(residual[i] + g[i])
        if r > t:
            bits.append("1")
            r = np.float32(r - one)
            deq.append(one)
        else:
            bits.append("0")
            r = np.float32(r + one)
            deq.append(-one)
        residual[i] = r
    return pack_bits(bits), np.array(deq, dtype=np.float32)


def one_bit_cases():
    cases = []
    seed = 900
    for t in ONE_BIT_THRESHOLDS:
        for n in ONE_BIT_LENGTHS + [ONE_BIT_LONG]:
            for kind in (("same", "changing") if n != ONE_BIT_LONG else ("changing",)):
                seed += 1
                rs = np.random.RandomState(seed)
                if kind == "same":
                    g = rs.uniform(-1.5, 1.5, n).astype(np.float32)
                    grads = [g.copy() for _ in range(ROUNDS)]
                else:
                    grads = [rs.uniform(-2.0, 2.0, n).astype(np.float32) for _ in range(ROUNDS)]
                cases.append({"threshold": t, "kind": kind, "grads": grads})
        tt = np.float32(t)
        g = np.array([tt, np.nextafter(tt, np.float32(np.inf)), np.nextafter(tt, np.float32(-np.inf)),
                      0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e30, -1e30, 1e-45, 0.5, -0.5],
                     dtype=np.float32)
        cases.append({"threshold": t, "kind": "special", "grads": [g.copy() for _ in range(ROUNDS)]})
    out = []
    for c in cases:
        residual = np.zeros(len(c["grads"][0]), dtype=np.float32)
        rounds = []
        for g in c["grads"]:
            packed, deq = compute_1bit(g, residual, c["threshold"])
            rounds.append({"grad": f32le(g), "packed": packed.hex(), "dequantized": f32le(deq)})
        out.append({"threshold_f32": f32_bits(c["threshold"]), "kind": c["kind"],
                    "n": len(c["grads"][0]), "rounds": rounds})
    return out


# ---------------------------------------------------------------------------------------


def same_bits(a, b):
    return np.array_equal(np.asarray(a, dtype=np.float32).view(np.uint32),
                          np.asarray(b, dtype=np.float32).view(np.uint32))


def main():
    import mxnet as mx

    cases = two_bit_cases()
    by_threshold = {}
    for c in cases:
        by_threshold.setdefault(c["threshold"], []).append(c)

    two_bit, wire = [], []
    for t, group in by_threshold.items():
        dequantized = run_device_store(mx, t, group)
        encoded, packed, pulled = run_dist_job(t, group)
        entry = {"threshold": repr(t), "threshold_f32": f32_bits(t), "encoded_params": encoded}
        wire.append(entry)
        exact_wire = t not in WIRE_ONLY_THRESHOLDS
        for c, deq, pk, pl in zip(group, dequantized, packed, pulled):
            residual = np.zeros(len(c["grads"][0]), dtype=np.float32)
            rounds = []
            for g, d, p, q in zip(c["grads"], deq, pk, pl):
                sim_packed, sim_deq = compute_2bit(g, residual, t)
                q = np.frombuffer(bytes.fromhex(q), dtype="<f4")
                # sanity: the simulator, the device store and the dist job agree
                assert sim_packed.hex() == p, (t, c["kind"], sim_packed.hex(), p)
                assert same_bits(sim_deq, d), (t, c["kind"], sim_deq, d)
                if exact_wire:
                    assert same_bits(q, d), (t, c["kind"], q, d)
                r = {"grad": f32le(g), "packed": p, "dequantized": f32le(d)}
                if not exact_wire:
                    r["dist_pulled"] = f32le(q)
                rounds.append(r)
            two_bit.append({"threshold": repr(t), "threshold_f32": f32_bits(t), "kind": c["kind"],
                            "n": len(c["grads"][0]), "rounds": rounds})

    devices = []
    for c in device_cases():
        sums = run_device_store(mx, c["threshold"], [c])[0]
        devices.append({
            "threshold": repr(c["threshold"]), "threshold_f32": f32_bits(c["threshold"]),
            "devices": c["devices"], "n": len(c["grads"][0][0]),
            "rounds": [{"grads": [f32le(gd) for gd in g], "sum": f32le(s)}
                       for g, s in zip(c["grads"], sums)],
        })

    doc = {
        "mxnet_version": mx.__version__,
        "two_bit": two_bit,
        "two_bit_devices": devices,
        "wire": wire,
        "params": run_params(mx),
        "one_bit": {
            "source": "NOT produced by MXNet (1.9.1 has no 1-bit compression): a float32 "
                      "re-implementation of MXNet 2.x's nightly-test simulator compute_1bit, "
                      "see generate.py",
            "cases": one_bit_cases(),
        },
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compression.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"), allow_nan=False)
        f.write("\n")


if __name__ == "__main__":
    main()

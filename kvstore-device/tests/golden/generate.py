"""Generates compression.json: MXNet 1.9.1's `device` kvstore with gradient compression,
observed on CPU contexts.

Run with MXNet 1.9.1 installed (pip install mxnet==1.9.1 numpy==1.23.5):

    python3 generate.py      # writes compression.json next to this script

Each case creates mx.kv.create('device'), sets gradient compression (2-bit; MXNet 1.9.1
rejects 1-bit, which is recorded under "rejected"), initialises its keys, and for several
rounds pushes (or pushpulls) a list of float32 values per key on mx.cpu(0), mx.cpu(1), ...
(one value per "device"), then pulls every key. CommDevice quantises each device's value
against that device's residual for the key, dequantises it and sums the dequantised copies,
so the pulled values carry the residuals from round to round.

Cases cover: 1 to 4 devices, thresholds whose sums are not exact in float32 (the order of the
sum shows), several keys in one call, pushpull, compression set after init, and an sgd
optimizer (with momentum and weight decay) running on the compressed sums.

Arrays are stored as hex strings of their little-endian float32 memory bytes (8 hex digits per
element), so every bit (signs of zeros included) survives.
"""
import json
import os

import numpy as np
import mxnet as mx

ROUNDS = 6


def f32le(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def mxnet_error_text(e):
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msgs = [l for l in lines if l.startswith("MXNetError:")]
    text = (msgs or lines or [type(e).__name__])[-1]
    if text.startswith("MXNetError:"):
        text = text[len("MXNetError:"):].strip()
    return text


# (name, threshold, devices per key, sizes of the keys, op, optimizer, set_after_init, scale)
CASES = [
    ("one_device", 0.5, 1, [37], "push", None, False, 1.0),
    ("three_devices", 0.5, 3, [37], "push", None, False, 1.0),
    ("three_devices_t0.1", 0.1, 3, [50], "push", None, False, 1.0),
    ("four_devices_t0.1", 0.1, 4, [53], "push", None, False, 1.0),
    ("four_devices_t0.3", 0.3, 4, [100], "push", None, False, 1.0),
    ("two_keys_one_call", 0.25, 3, [17, 40], "push", None, False, 1.0),
    ("pushpull", 0.5, 3, [33], "pushpull", None, False, 1.0),
    ("set_after_init", 0.5, 2, [21], "push", None, True, 1.0),
    ("sgd_momentum", 0.5, 3, [29], "push",
     {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, False, 1.0),
    ("sgd_plain_t0.1", 0.1, 2, [31], "push", {"name": "sgd", "learning_rate": 0.05}, False, 1.0),
    ("large_values", 0.5, 3, [64], "push", None, False, 4.0),
]


def run_case(seed, name, threshold, devices, sizes, op, optimizer, set_after_init, scale):
    rs = np.random.RandomState(seed)
    kv = mx.kv.create("device")
    params = {"type": "2bit", "threshold": threshold}
    if not set_after_init:
        kv.set_gradient_compression(params)
    keys = list(range(3, 3 + len(sizes)))
    inits = [(rs.uniform(-1.0, 1.0, n)).astype(np.float32) for n in sizes]
    for k, v in zip(keys, inits):
        kv.init(k, mx.nd.array(v, ctx=mx.cpu(0), dtype="float32"))
    if set_after_init:
        kv.set_gradient_compression(params)
    if optimizer is not None:
        opt = dict(optimizer)
        kv.set_optimizer(mx.optimizer.create(opt.pop("name"), **opt))
    rounds = []
    for _ in range(ROUNDS):
        values = [[(rs.uniform(-1.0, 1.0, n) * threshold * scale).astype(np.float32)
                   for _ in range(devices)] for n in sizes]
        nds = [[mx.nd.array(v, ctx=mx.cpu(d), dtype="float32") for d, v in enumerate(vs)]
               for vs in values]
        outs = [mx.nd.zeros((n,), ctx=mx.cpu(0)) for n in sizes]
        if op == "pushpull":
            kv.pushpull(keys, nds, out=outs)
        else:
            kv.push(keys, nds)
            kv.pull(keys, out=outs)
        pulled = [o.asnumpy().astype(np.float32) for o in outs]
        rounds.append({
            "values": [[f32le(v) for v in vs] for vs in values],
            "pulled": [f32le(p) for p in pulled],
        })
    return {
        "name": name,
        "threshold": threshold,
        "devices": devices,
        "keys": keys,
        "sizes": sizes,
        "op": op,
        "optimizer": optimizer,
        "set_after_init": set_after_init,
        "init": [f32le(v) for v in inits],
        "rounds": rounds,
    }


def rejected():
    out = []
    for params in [{"type": "1bit"}, {"type": "1bit", "threshold": "0.5"},
                   {"type": "2bit", "threshold": "0"}, {"type": "3bit"}]:
        kv = mx.kv.create("device")
        try:
            kv.set_gradient_compression(params)
            out.append({"params": params, "mxnet_error": None})
        except Exception as e:  # pylint: disable=broad-except
            out.append({"params": params, "mxnet_error": mxnet_error_text(e)})
    return out


def main():
    cases = [run_case(700 + i, *c) for i, c in enumerate(CASES)]
    doc = {
        "mxnet_version": mx.__version__,
        "source": "MXNet's own device kvstore on mx.cpu(i) contexts (tests/golden/generate.py)",
        "cases": cases,
        "rejected": rejected(),
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compression.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print("wrote", path, "cases:", len(cases))


if __name__ == "__main__":
    main()

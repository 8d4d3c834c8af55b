#!/usr/bin/env python3
"""Side-by-side timings of the `local` store and MXNet 1.9.1's `mx.kv.create('local')`.

Usage (run with the Python of a virtual environment that has MXNet 1.9.1):

    python3 -m venv /tmp/mxbench-venv
    /tmp/mxbench-venv/bin/pip install mxnet==1.9.1 numpy==1.23.5
    /tmp/mxbench-venv/bin/python kvstore-local/scripts/compare_mxnet.py [options]

Options:
    --threads N       reduction threads for both stores (MXNET_KVSTORE_REDUCTION_NTHREADS) and
                      MXNet's OpenMP threads (OMP_NUM_THREADS); default: the value already in
                      the environment, else the number of CPUs. A variable already set in the
                      environment wins over this default, never over an explicit --threads.
    --reps N          timed repetitions per workload (default 15); medians are reported
    --warmup N        untimed runs first (default 3)
    --rounds K        alternate the two stores K times (ours, MXNet, ours, MXNet, ...) and
                      report the median over the rounds of each round's median (default 1);
                      on a shared or noisy machine this pairs both sides with the same
                      conditions
    --rust-json PATH  read the Rust figures from PATH (the output of
                      `cargo run --release -p kvstore-local --example workloads -- --json`)
                      instead of running that command
    --json-out PATH   also write every figure as one JSON object to PATH

The workloads (all float32, arrays allocated before timing, `mx.nd.waitall()` after every
step so that MXNet's asynchronous engine has finished the work that was timed):

    push_pull_8x16MiB    one key, 8 per-device values of 16 MiB pushed, pulled into 8 outputs
    push_pull_2x64MiB    one key, 2 values of 64 MiB pushed, pulled into 2 outputs
    small_keys_1000x256  1000 int keys of 256 floats, one list push and one list pull
    sgd_momentum_16MiB   SGD(learning_rate=0.1, momentum=0.9) set with kv.set_optimizer,
                         one 16 MiB gradient pushed, the weight pulled
    reduce_only_8x16MiB  the push of push_pull_8x16MiB alone (for reference)

In every round the Rust side runs first (its process has exited before MXNet runs), then
MXNet.
The table gives the median seconds of each and the ratio MXNet / ours (above 1: ours is
faster), with the targets for the comparison, followed by the memory-bandwidth floor measured
by the Rust program and the reduction's time as a multiple of it.
"""

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
F32 = 4

WORKLOADS = [
    # name, target ratio MXNet / ours (None: no target)
    ("push_pull_8x16MiB", 2.0),
    ("push_pull_2x64MiB", 2.0),
    ("small_keys_1000x256", 5.0),
    ("sgd_momentum_16MiB", None),
    ("reduce_only_8x16MiB", None),
]


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rust-json", default=None)
    p.add_argument("--json-out", default=None)
    return p.parse_args()


def configure_threads(explicit):
    """Sets the thread variables both stores read; returns them."""
    default = os.environ.get("MXNET_KVSTORE_REDUCTION_NTHREADS") or str(os.cpu_count() or 1)
    for var in ("MXNET_KVSTORE_REDUCTION_NTHREADS", "OMP_NUM_THREADS"):
        if explicit is not None:
            os.environ[var] = str(explicit)
        else:
            os.environ.setdefault(var, default)
    names = (
        "MXNET_KVSTORE_REDUCTION_NTHREADS",
        "OMP_NUM_THREADS",
        "MXNET_KVSTORE_BIGARRAY_BOUND",
        "MXNET_CPU_WORKER_NTHREADS",
    )
    return {n: os.environ[n] for n in names if n in os.environ}


def repo_root():
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def rust_figures(args):
    if args.rust_json:
        with open(args.rust_json) as f:
            return json.load(f)
    cmd = [
        "cargo", "run", "--release", "-p", "kvstore-local", "--example", "workloads", "--",
        "--json", "--reps", str(args.reps), "--warmup", str(args.warmup),
    ]
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=repo_root(), stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"compare_mxnet: {' '.join(cmd)} failed with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(step, warmup, reps):
    """Median seconds of `step`, each run followed by mx.nd.waitall()."""
    import mxnet as mx

    for _ in range(warmup):
        step()
        mx.nd.waitall()
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        step()
        mx.nd.waitall()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(arrays, expected, name):
    for i, a in enumerate(arrays):
        v = a.asnumpy()
        if not (v == expected).all():
            sys.exit(f"compare_mxnet: MXNet {name}: output {i} is not {expected}")


def mxnet_figures(args):
    import mxnet as mx

    ctx = mx.cpu()
    figures = {"mxnet_version": mx.__version__}

    def push_pull(devices, nbytes, name):
        n = nbytes // F32
        kv = mx.kv.create("local")
        kv.init(0, mx.nd.zeros((n,), ctx=ctx))
        values = [mx.nd.full((n,), d + 1, ctx=ctx) for d in range(devices)]
        outs = [mx.nd.zeros((n,), ctx=ctx) for _ in range(devices)]
        mx.nd.waitall()

        def step():
            kv.push(0, values)
            kv.pull(0, out=outs)

        figures[name] = timed(step, args.warmup, args.reps)
        check(outs, devices * (devices + 1) / 2, name)
        if devices == 8:
            figures["reduce_only_8x16MiB"] = timed(
                lambda: kv.push(0, values), args.warmup, args.reps
            )

    push_pull(8, 16 * MIB, "push_pull_8x16MiB")
    gc.collect()
    push_pull(2, 64 * MIB, "push_pull_2x64MiB")
    gc.collect()

    kv = mx.kv.create("local")
    keys = list(range(1000))
    kv.init(keys, [mx.nd.zeros((256,), ctx=ctx) for _ in keys])
    values = [mx.nd.full((256,), k % 7 + 1, ctx=ctx) for k in keys]
    outs = [mx.nd.zeros((256,), ctx=ctx) for _ in keys]
    mx.nd.waitall()

    def small_step():
        kv.push(keys, values)
        kv.pull(keys, out=outs)

    figures["small_keys_1000x256"] = timed(small_step, args.warmup, args.reps)
    for k in (0, 1, 999):
        check([outs[k]], k % 7 + 1, "small_keys_1000x256")
    del kv, values, outs
    gc.collect()

    n = 16 * MIB // F32
    kv = mx.kv.create("local")
    kv.set_optimizer(mx.optimizer.SGD(learning_rate=0.1, momentum=0.9))
    kv.init(0, mx.nd.ones((n,), ctx=ctx))
    grad = mx.nd.full((n,), 1e-3, ctx=ctx)
    out = mx.nd.zeros((n,), ctx=ctx)
    mx.nd.waitall()

    def sgd_step():
        kv.push(0, grad)
        kv.pull(0, out=out)

    figures["sgd_momentum_16MiB"] = timed(sgd_step, args.warmup, args.reps)
    return figures


def combine(figures):
    """The median over rounds of every measured (float) figure (None when a round has none)."""
    out = dict(figures[0])
    for name, value in figures[0].items():
        values = [f.get(name) for f in figures]
        if isinstance(value, float):
            out[name] = None if None in values else statistics.median(values)
    return out


def fmt(seconds):
    return "skipped" if seconds is None else f"{seconds:.6f}"


def main():
    args = parse_args()
    if importlib.util.find_spec("mxnet") is None:
        sys.exit(f"compare_mxnet: {sys.executable} cannot import mxnet; run this script with the "
                 "Python of a virtual environment holding mxnet==1.9.1 (see the usage above)")
    env = configure_threads(args.threads)
    print("environment:", " ".join(f"{k}={v}" for k, v in env.items()), file=sys.stderr)

    rounds = []
    for r in range(max(args.rounds, 1)):
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
        rounds.append((rust_figures(args), mxnet_figures(args)))
        gc.collect()
    ours = combine([o for o, _ in rounds])
    theirs = combine([t for _, t in rounds])

    print(f"MXNet {theirs['mxnet_version']} local store vs kvstore-local "
          f"(medians of {args.reps} timed runs, {len(rounds)} round(s); "
          f"{' '.join(f'{k}={v}' for k, v in env.items())})")
    print(f"{'workload':<22} {'MXNet (s)':>11} {'ours (s)':>11} {'MXNet/ours':>11} {'target':>8}")
    rows = {}
    for name, target in WORKLOADS:
        mx_s, our_s = theirs.get(name), ours.get(name)
        ratio = mx_s / our_s if mx_s and our_s else None
        rows[name] = {"mxnet": mx_s, "ours": our_s, "ratio": ratio, "target": target}
        verdict = ""
        if target is not None and ratio is not None:
            verdict = f">= {target:g}x " + ("met" if ratio >= target else "MISSED")
        print(f"{name:<22} {fmt(mx_s):>11} {fmt(our_s):>11} "
              f"{('%.2fx' % ratio) if ratio else '-':>11} {verdict}")
    floor_ratio = ours.get("reduce_floor_ratio")
    print(f"memory floor: c = a + b over 64 MiB, {ours.get('floor_gbps', 0):.2f} GB/s "
          f"({ours.get('floor_threads')} thread(s)); copy {ours.get('floor_copy_gbps', 0):.2f} GB/s")
    if floor_ratio is not None:
        print(f"reduction 8 x 16 MiB: {ours['reduce_only_8x16MiB']:.6f} s = {floor_ratio:.3f}x "
              f"the floor ({ours['reduce_floor_seconds']:.6f} s), target <= 1.25x "
              + ("met" if floor_ratio <= 1.25 else "MISSED"))

    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"environment": env, "mxnet": theirs, "ours": ours, "rows": rows,
                       "rounds": [{"ours": o, "mxnet": t} for o, t in rounds]}, f, indent=2)


if __name__ == "__main__":
    main()

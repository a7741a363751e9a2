"""Feynman–Kac correctors: exactness on closed-form targets and cost per step, through the real ComfyUI path.

    python bench/fkc.py [--particles K] [--steps N] [--cost-repeats R] [--out BENCHMARKS.md]

Exactness: the analytic Gaussian model (tests/analytic.py: its denoiser is the exact posterior mean) with three
components N(2, 0.5²), N(1, 0.5²), N(0, 1.5²) serves as the experts of methods.md Appendix A.2 — CFG β = 3
(CFGGuider, cond = N(2, 0.25), negative = N(0, 2.25)), product and composition (GL_FKCGuider), annealing β = 2
and 0.5. Each target is Gaussian, so its mean and variance are known in closed form. Every case runs the pack's
FKCSampler (ddpm propagation, clamp 0, temperature 1 = exact weights) and the same sampler with the weights off
(temperature 0: the plain guided SDE), K particles × 2 images × 4 elements, Karras schedule (EPS) or the simple
schedule (flow, same model as SD3-style CONST), through CFGGuider.sample exactly as SamplerCustomAdvanced runs it.

Cost: the demo model (GL_DemoModelLoader's default file), one 32×32 image, 10 steps: plain CFG with core
`euler_ancestral` against GL_SamplerFKC with K particles (same CFGGuider), timed alternately; the ratio
t_FKC / (K · t_CFG) is the issue's cost target (≤ 1.1). Model rows are counted by a DIFFUSION_MODEL wrapper.

Writes only the `fkc` section of the Markdown file and bench/results/fkc.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "tests", REPO / "tests" / "kernels", REPO):
    if str(_p) not in sys.path:
        sys.path.append(str(_p)) if _p == REPO else sys.path.insert(0, str(_p))

import torch  # noqa: E402

from _machine import comfy_version, cpu_model, git_revision  # noqa: E402
from _markdown import write_section  # noqa: E402

SECTION = "fkc"
TITLE = "Feynman–Kac correctors: exactness on closed-form targets and cost per step"
MEANS, STDS = [2.0, 1.0, 0.0], [0.5, 0.5, 1.5]
# case: (label, mode, beta, expert components, betas of the closed-form target)
CASES = [("CFG β = 3", "cfg", 3.0, (0, 2), (3.0, -2.0)), ("product q₁·q₂", "product", None, (0, 2), (1.0, 1.0)),
         ("composition q₁·q₂/q_u", "composition", None, (0, 1, 2), (1.0, 1.0, -1.0)),
         ("annealing β = 2", "annealing", 2.0, (0,), (2.0,)), ("annealing β = 0.5", "annealing", 0.5, (0,), (0.5,))]


def closed_form(components, betas):
    prec = sum(b / STDS[c] ** 2 for c, b in zip(components, betas))
    mean = sum(b * MEANS[c] / STDS[c] ** 2 for c, b in zip(components, betas)) / prec
    return mean, 1.0 / prec


def exactness(host, args):
    import comfy.samplers
    from analytic import build_gmm_model, component_cond
    fkc = host.pack("guiders.fkc")
    rows = []
    for kind in args.families:
        patcher, _net = build_gmm_model(MEANS, STDS, [1 / 3] * 3, kind=kind)
        ms = patcher.get_model_object("model_sampling")
        sig = comfy.samplers.calculate_sigmas(ms, "karras" if kind == "eps" else "simple", args.steps)
        for label, mode, beta, comps, betas in CASES:
            conds = [component_cond(c, 3) for c in comps]
            if mode == "cfg":
                guider = comfy.samplers.CFGGuider(patcher)
                guider.set_conds(conds[0], conds[1])
                guider.set_cfg(beta)
            else:
                guider = fkc.FKCGuider(patcher, mode, beta if beta is not None else 1.0)
                names = fkc.MODE_EXPERTS[mode]
                guider.set_expert_conds(**dict(zip(names, conds)))
            tm, tv = closed_form(comps, betas)
            row = {"family": kind, "case": label, "target_mean": tm, "target_var": tv}
            for key, temp in (("fkc", 1.0), ("plain", 0.0)):
                sampler = fkc.FKCSampler(particles=args.particles, clamp=0.0, temperature=temp, output="all")
                noise = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(args.seed))
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = guider.sample(noise, torch.zeros_like(noise), sampler, sig, seed=args.seed,
                                        disable_pbar=True)
                v = out.double().flatten()
                row[key] = {"mean": v.mean().item(), "var": v.var().item(), "seconds": time.perf_counter() - t0}
            print(f"{kind} {label}: target {tm:.3f}/{tv:.4f}; FKC {row['fkc']['mean']:.3f}/{row['fkc']['var']:.4f}; "
                  f"no weights {row['plain']['mean']:.3f}/{row['plain']['var']:.4f}", flush=True)
            rows.append(row)
    return rows


def cost(host, args):
    import comfy.patcher_extension as pe
    import comfy.samplers
    dm = host.pack("guiders.demo_model")
    fkc = host.pack("guiders.fkc")
    patcher, clip, _vae = dm.load_demo_model()
    counter = {"rows": 0}

    def wrapper(executor, *a, **kw):
        counter["rows"] += int((a[0] if a else kw["x"]).shape[0])
        return executor(*a, **kw)
    model = patcher.clone()
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "gl_bench.fkc", wrapper)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle on a white background"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.cost_steps)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    samplers = {"cfg": comfy.samplers.sampler_object("euler_ancestral")}
    for k in args.cost_particles:
        samplers[f"fkc{k}"] = fkc.FKCSampler(particles=k)

    def once(sampler):
        counter["rows"] = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            guider.sample(noise, torch.zeros_like(noise), sampler, sig, seed=args.seed, disable_pbar=True)
        return time.perf_counter() - t0, counter["rows"]
    for s in samplers.values():
        once(s)                                                        # warm-up
    times = {k: [] for k in samplers}
    rows = {}
    for rnd in range(args.cost_repeats):
        for key in (list(samplers) if rnd % 2 == 0 else list(reversed(samplers))):
            t, r = once(samplers[key])
            times[key].append(t)
            rows[key] = r
    out = {}
    base = statistics.median(times["cfg"])
    for key in samplers:
        k = 1 if key == "cfg" else int(key[3:])
        med = statistics.median(times[key])
        out[key] = {"k": k, "median_s": med, "rows": rows[key], "per_step_s": med / args.cost_steps,
                    "ratio_to_k_cfg": med / (k * base)}
        print(f"cost {key}: {med:.3f} s ({rows[key]} model rows), ratio to K × CFG {out[key]['ratio_to_k_cfg']:.3f}",
              flush=True)
    return out


def render(exact, costs, *, args, info) -> str:
    lines = [f"## {args.title}", "",
             "Command (from the repository root, `python` = the project venv's interpreter):", "",
             f"    {info['command']}", "",
             f"- Date: {info['date']}; machine: {info['cpu']}, {info['cores']} cores, `torch.set_num_threads("
             f"{args.threads})`; torch {torch.__version__}, ComfyUI {info['comfy']}, Guidance Lab {info['rev']}.",
             f"- Exactness: analytic Gaussian model through `CFGGuider.sample` (what SamplerCustomAdvanced runs), "
             f"`GL_SamplerFKC` with ddpm propagation, resampling every step, clamp 0, temperature 1; "
             f"{args.particles} particles × 2 images × 4 elements; {args.steps} steps (EPS: karras, σ 14.6 → 0.029; "
             "flow: simple, σ 1 → 0; products and annealing start at σ = 0.995). \"no weights\" = the same sampler "
             "with temperature 0 (the guided SDE the weights correct). Relative errors of at most 5 % on the "
             "variance are the particle-sampler issue's bar.", "",
             "| family | target | exact mean / var | FKC mean / var (rel. var error) | no weights mean / var "
             "(rel. var error) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in exact:
        f, p = r["fkc"], r["plain"]
        lines.append(f"| {r['family']} | {r['case']} | {r['target_mean']:.3f} / {r['target_var']:.4f} | "
                     f"{f['mean']:.3f} / {f['var']:.4f} ({f['var'] / r['target_var'] - 1:+.1%}) | "
                     f"{p['mean']:.3f} / {p['var']:.4f} ({p['var'] / r['target_var'] - 1:+.1%}) |")
    if not costs:
        return "\n".join(lines)
    lines += ["", f"Cost per image on the demo model (one 32×32 image, cfg 5, {args.cost_steps} steps, median of "
              f"{args.cost_repeats} alternating rounds; CFG = core `euler_ancestral`):", "",
              "| sampler | model rows | median s | s / step | ÷ (K × CFG time) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key, c in costs.items():
        label = "CFG (euler_ancestral)" if key == "cfg" else f"GL_SamplerFKC, K = {c['k']}"
        lines.append(f"| {label} | {c['rows']} | {c['median_s']:.3f} | {c['per_step_s']:.4f} | "
                     f"{c['ratio_to_k_cfg']:.3f} |")
    worst = max(c["ratio_to_k_cfg"] for k, c in costs.items() if k != "cfg")
    lines += ["", f"Cost target ≤ 1.1 × K × CFG per step: **{'met' if worst <= 1.1 else 'not met'}** "
              f"(worst {worst:.3f})."]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=8192, help="K for the exactness runs (default 8192)")
    ap.add_argument("--steps", type=int, default=200, help="steps of the exactness runs (default 200)")
    ap.add_argument("--cost-steps", type=int, default=10, help="steps of the cost runs (default 10)")
    ap.add_argument("--cost-particles", type=int, nargs="+", default=[4, 8], help="K of the cost runs")
    ap.add_argument("--cost-repeats", type=int, default=5, help="timed rounds of the cost runs (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="+", choices=("eps", "flow"), default=["eps", "flow"],
                    help="model families of the exactness runs (default both)")
    ap.add_argument("--section", default=SECTION, help=f"section of --out to write (default {SECTION!r})")
    ap.add_argument("--title", default=TITLE, help="heading of the section")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    wall0 = time.perf_counter()
    import host as host_module
    host = host_module.boot()
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    exact = exactness(host, args)
    costs = cost(host, args) if args.cost_repeats > 0 else {}           # --cost-repeats 0: exactness only
    info = dict(command=shlex.join(["python", "bench/fkc.py", *argv]), date=datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(), cores=os.cpu_count(),
        comfy=comfy_version(), rev=git_revision(), wall=time.perf_counter() - wall0)
    body = render(exact, costs, args=args, info=info)
    out = write_section(args.out, args.section, body)
    raw = BENCH_DIR / "results" / f"{args.section}.json"
    raw.write_text(json.dumps(dict(args=vars(args), info=info, exactness=exact, cost=costs), indent=1),
                   encoding="utf-8")
    print(body)
    print(f"\nwrote section '{args.section}' of {out}; total {info['wall'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed/memory benchmarks of sd-distill on the SD-2.1-base architecture (random weights), CPU.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench --quick [--out bench.json]

Each memory figure comes from its own subprocess (peak RSS = VmHWM, so cases cannot contaminate
each other); timing ratios come from one process that interleaves the variants round by round
(a shared machine's noise then hits every variant alike). ``--tiny`` runs the same code on the
test suite's tiny pipeline in seconds (``--in_process`` skips the subprocesses: no memory figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.sd21 import Parts, build_parts, build_pipeline, build_unet, param_count
from sd_distill.files import strict_json

PROMPT = "a photo of an astronaut riding a horse on the moon"
LORA_RANK = 4
GB = 1e9


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------
def peak_rss_gb() -> float:
    """This process's peak resident set size (VmHWM), in GB (1e9 bytes)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    variants: dict[str, Callable[[], float]], rounds: int, warmup: int, samples: dict[str, list[float]] | None = None
) -> dict[str, float]:
    """Median seconds per variant. Each round runs every variant once; the order rotates by one
    each round, so no variant always runs first (or right after the same neighbour).
    ``samples`` (if given) receives every timed repetition."""
    samples = {} if samples is None else samples
    names = list(variants)
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = variants[name]()
            if r >= warmup:
                samples.setdefault(name, []).append(seconds)
    return {k: statistics.median(samples[k]) for k in names}


# ------------------------------------------------------------------------------------------------
# Training step
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainCase:
    """One training configuration (batch 1, fp32 on the CPU)."""

    teacher: str = "shared"  # "shared" (adapter disabled) | "separate" (second frozen UNet)
    full_finetune: bool = False  # the seed: every UNet weight trains (AdamW), no LoRA
    cached: bool = True  # latents + text embeddings precomputed; False: VAE + text encoder each step
    encoders_loaded: bool = False  # keep VAE + text encoder in memory (needed when not cached)
    checkpointing: bool = False
    width: float = 1.0  # UNet width multiplier (0.5: same structure, ~1/4 of the parameters)


MEMORY_CASES: dict[str, TrainCase] = {
    "ours": TrainCase(),
    "separate_teacher": TrainCase(teacher="separate"),
    "cached_encoders_held": TrainCase(encoders_loaded=True),  # what train.py holds today with --cache_*
    "uncached": TrainCase(cached=False, encoders_loaded=True),
    "checkpointing": TrainCase(checkpointing=True),
    "ours_half": TrainCase(width=0.5),
    "seed_half": TrainCase(teacher="separate", full_finetune=True, width=0.5),
}


class TwoPassUNet:
    """Calls ``unet`` once per half of a ``[∅; c]`` batch: the unbatched teacher, same math."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    def __call__(
        self, sample: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **kw: Any
    ) -> tuple[torch.Tensor]:
        halves = zip(sample.chunk(2), t.chunk(2), encoder_hidden_states.chunk(2))
        outs = [self.unet(x, tt, encoder_hidden_states=e, **kw)[0] for x, tt, e in halves]
        return (torch.cat(outs),)


class Trainer:
    """Everything one training step needs, set up as ``train.py`` does (LoRA rank 4, AdamW)."""

    def __init__(self, parts: Parts, case: TrainCase, resolution: int, arch: str) -> None:
        from sd_distill.lora import attach_lora
        from sd_distill.models import Components, encode_prompts
        from sd_distill.train.config import TrainConfig
        from sd_distill.train.recipe import build_objective

        self.parts, self.case, self.resolution = parts, case, resolution
        unet = parts.unet
        if case.full_finetune:
            unet.requires_grad_(True)
            params = list(unet.parameters())
        else:
            params = attach_lora(unet, LORA_RANK)
        unet.train()
        if case.checkpointing:
            unet.enable_gradient_checkpointing()
        self.teacher_unet = None
        if case.teacher == "separate":
            other = build_parts(arch, case.width, encoders=False).unet if arch == "tiny" else build_unet(case.width)
            self.teacher_unet = other.requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.config = TrainConfig()  # guidance 7.5, MSE, no caption dropout
        self.components = Components(parts.tokenizer, parts.text_encoder, parts.vae, unet, parts.scheduler)
        g = torch.Generator().manual_seed(0)
        if parts.text_encoder is not None:
            self.uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""])  # [1, 77, D], once
        else:
            self.uncond = torch.randn(1, 77, parts.text_dim, generator=g)
        lat = resolution // parts.vae_scale
        self.cached_batch = {
            "latents": torch.randn(1, parts.latent_channels, lat, lat, generator=g),
            "text_embeddings": torch.randn(1, 77, parts.text_dim, generator=g),
        }
        self.raw_batch = {
            "pixel_values": torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1,
            "caption": [PROMPT],
        }
        self.objective = build_objective(
            self.config, self.components, self.uncond, torch.float32
        )  # as setup() builds it
        self.n = 0

    def teacher(self, two_pass: bool) -> Callable[[], Any]:
        from sd_distill.lora import adapter_disabled

        if self.teacher_unet is not None:
            return lambda: contextlib.nullcontext(self.teacher_unet)
        unet = self.parts.unet

        @contextlib.contextmanager
        def shared() -> Iterator[Any]:
            with adapter_disabled(unet):
                yield TwoPassUNet(unet) if two_pass else unet

        return shared

    def step(self, cached: bool | None = None, two_pass: bool = False) -> float:
        """One optimizer step through the recipe's ``distill_step``; returns seconds."""
        from sd_distill.train.step import distill_step

        cached = self.case.cached if cached is None else cached
        batch = self.cached_batch if cached else self.raw_batch
        self.n += 1
        gen = torch.Generator().manual_seed(self.n)
        start = time.perf_counter()
        o = self.objective
        per_sample, _ = distill_step(
            batch, self.parts.unet, self.teacher(two_pass), o["source"], o["target"], o["loss"], gen
        )
        per_sample.mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def worker_memory(case_name: str, resolution: int, arch: str, steps: int) -> dict[str, Any]:
    """Build one case, run ``steps`` optimizer steps; peak RSS and the median step time."""
    case = MEMORY_CASES[case_name]
    parts = build_parts(arch, case.width, encoders=case.encoders_loaded)
    unet_params = param_count(parts.unet)
    trainer = Trainer(parts, case, resolution, arch)
    times = [trainer.step() for _ in range(steps)]
    return {
        "case": case_name,
        **asdict(case),
        "peak_rss_gb": peak_rss_gb(),
        "unet_params": unet_params,
        "trainable_params": sum(p.numel() for p in trainer.optimizer.param_groups[0]["params"]),
        "step_s": statistics.median(times[1:] or times),
        "step_times": times,
    }


def worker_train_time(resolution: int, arch: str, rounds: int, warmup: int) -> dict[str, Any]:
    """Step-time variants on ONE model (ours + encoders loaded), interleaved round by round."""
    parts = build_parts(arch, encoders=True)
    tr = Trainer(parts, TrainCase(encoders_loaded=True), resolution, arch)
    unet = parts.unet

    def ckpt_step() -> float:
        unet.enable_gradient_checkpointing()
        try:
            return tr.step()
        finally:
            unet.disable_gradient_checkpointing()

    variants = {
        "ours": lambda: tr.step(),
        "two_pass": lambda: tr.step(two_pass=True),
        "uncached": lambda: tr.step(cached=False),
        "checkpointing": ckpt_step,
    }
    samples: dict[str, list[float]] = {}
    return {
        "median_s": interleave(variants, rounds, warmup, samples),
        "samples_s": samples,
        "peak_rss_gb": peak_rss_gb(),
    }


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
def worker_inference(resolution: int, arch: str, steps: int, rounds: int, compile_unet: bool) -> dict[str, Any]:
    """Seconds per image of whole pipeline calls, and UNet-only switches, interleaved."""
    from sd_distill.lora import attach_lora, lora_parameters

    parts = build_parts(arch, encoders=True)
    pipe = build_pipeline(parts)
    unet = parts.unet.eval()

    def render(w: float) -> float:
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():  # as sd_distill.eval.compare renders
            return timed(
                lambda: pipe(
                    PROMPT,
                    num_inference_steps=steps,
                    guidance_scale=w,
                    height=resolution,
                    width=resolution,
                    generator=g,
                    output_type="np",
                )
            )

    def add_adapter() -> None:  # a "trained" adapter: B perturbed (peft initialises it to zero)
        attach_lora(unet, LORA_RANK)
        with torch.no_grad():
            for name, p in lora_parameters(unet).items():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)

    def unfused() -> float:
        add_adapter()
        return render(1.0)

    def fused() -> float:  # fuse into the weights, keep peft wrappers (merged) ...
        unet.fuse_lora()
        seconds = render(1.0)
        unet.unload_lora()  # ... then drop them (weights stay fused): compare.py's distilled UNet
        return seconds

    render(7.5)  # warm-up: the largest (2B) batch first
    pipe_samples: dict[str, list[float]] = {}
    pipeline = interleave(
        {
            "base_cfg": lambda: render(7.5),
            "base_w1": lambda: render(1.0),  # the base UNet alone (= compare.py's fused, unloaded UNet)
            "lora_unfused": unfused,
            "lora_fused": fused,
        },
        rounds,
        warmup=0,
        samples=pipe_samples,
    )

    lat = resolution // parts.vae_scale
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, parts.latent_channels, lat, lat, generator=g)
    emb = torch.randn(2, 77, parts.text_dim, generator=g)
    t = torch.tensor([500, 500])

    def fwd(
        batch: int = 1, grad_mode: Any = torch.inference_mode, module: Any = unet, channels_last: bool = False
    ) -> float:
        xs = x[:batch].contiguous(memory_format=torch.channels_last) if channels_last else x[:batch]
        with grad_mode():
            return timed(lambda: module(xs, t[:batch], encoder_hidden_states=emb[:batch], return_dict=False))

    def channels_last() -> float:
        unet.to(memory_format=torch.channels_last)
        try:
            return fwd(channels_last=True)
        finally:
            unet.to(memory_format=torch.contiguous_format)

    def flush_denormal() -> float:
        torch.set_flush_denormal(True)
        try:
            return fwd()
        finally:
            torch.set_flush_denormal(False)

    switches: dict[str, Callable[[], float]] = {
        "unet_b1_inference_mode": fwd,
        "unet_b2_inference_mode": lambda: fwd(batch=2),
        "unet_b1_no_grad": lambda: fwd(grad_mode=torch.no_grad),
        "unet_b1_channels_last": channels_last,
        "unet_b1_flush_denormal": flush_denormal,
    }
    compile_s = None
    if compile_unet:
        compiled = torch.compile(unet)
        compile_s = timed(lambda: fwd(module=compiled))  # first call compiles
        switches["unet_b1_compiled"] = lambda: fwd(module=compiled)
    unet_samples: dict[str, list[float]] = {}
    unet_only = interleave(switches, rounds + 1, warmup=1, samples=unet_samples)
    return {
        "pipeline_s": pipeline,
        "unet_s": unet_only,
        "compile_s": compile_s,
        "steps": steps,
        "pipeline_samples_s": pipe_samples,
        "unet_samples_s": unet_samples,
        "peak_rss_gb": peak_rss_gb(),
    }


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    arch: str
    mem_resolution: int
    train_resolution: int
    infer_resolution: int
    infer_steps: int
    rounds: int
    mem_steps: int
    threads: int
    compile_unet: bool
    in_process: bool
    only: tuple[str, ...]


def make_plan(args: argparse.Namespace) -> Plan:
    tiny = args.tiny
    quick = args.quick
    res = 32 if tiny else (128 if quick else 256)  # timed rows
    return Plan(
        arch="tiny" if tiny else "sd21",
        mem_resolution=args.mem_resolution or (32 if tiny else 256),  # one step per case: 256 even in --quick
        train_resolution=args.resolution or res,
        infer_resolution=args.infer_resolution or args.resolution or res,
        infer_steps=args.steps or (4 if quick else 8),
        rounds=args.rounds or (3 if quick else 5),
        mem_steps=args.mem_steps or (1 if quick else 2),
        threads=args.threads,
        compile_unet=args.compile,
        in_process=args.in_process,
        only=tuple(args.only.split(",")) if args.only else ("memory", "train_time", "inference"),
    )


def call_worker(plan: Plan, kind: str, **kw: Any) -> dict[str, Any]:
    """Run one worker, in a fresh process unless ``plan.in_process``; its result as a dict."""
    fns = {"memory": worker_memory, "train_time": worker_train_time, "inference": worker_inference}
    start = time.perf_counter()
    if plan.in_process:
        out = fns[kind](**kw)
    else:
        cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", kind, "--worker_args", json.dumps(kw)]
        env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "MKL_NUM_THREADS": str(plan.threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"worker {kind} {kw} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        out = json.loads(line.removeprefix("RESULT "))
    out["wall_s"] = time.perf_counter() - start
    print(f"[bench] {kind} {kw} done in {out['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return out


def run_all(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {"plan": asdict(plan), "memory": {}}
    common = {"arch": plan.arch}
    if "memory" in plan.only:
        for name, case in MEMORY_CASES.items():
            steps = plan.mem_steps if case.width == 1.0 else 3  # half width: cheap, time it too
            results["memory"][name] = call_worker(
                plan, "memory", case_name=name, resolution=plan.mem_resolution, steps=steps, **common
            )
    if "train_time" in plan.only:
        results["train_time"] = call_worker(
            plan, "train_time", resolution=plan.train_resolution, rounds=plan.rounds, warmup=1, **common
        )
    if "inference" in plan.only:
        results["inference"] = call_worker(
            plan,
            "inference",
            resolution=plan.infer_resolution,
            steps=plan.infer_steps,
            rounds=plan.rounds,
            compile_unet=plan.compile_unet,
            **common,
        )
    return results


def paired_ratio(samples: dict[str, list[float]] | None, a: str, b: str, fallback: float) -> float:
    """Median over rounds of ``a / b`` measured in the same round: robust to load that drifts
    between rounds on a shared machine (a ratio of medians is not)."""
    if not samples or a not in samples or b not in samples:
        return fallback
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def ratio_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(row, measured, target, met) for the table. Timing ratios are paired per round; the values
    in brackets are the medians of each side."""
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: float | None, detail: str, target: float | None = None, lower: bool = True) -> None:
        if value is None:
            return
        met = "" if target is None else ("yes" if (value <= target if lower else value >= target) else "NO")
        rows.append((name, f"{value:.2f} ({detail})", "" if target is None else f"≤ {target:.2f}", met))

    mem = r.get("memory", {})
    if not r["plan"]["in_process"] and mem:
        m = {k: v["peak_rss_gb"] for k, v in mem.items()}
        unet_gb = mem["ours"]["unet_params"] * 4 / GB
        seed_est = m["ours"] + 4 * unet_gb  # + grads + 2 AdamW moments + a second fp32 UNet
        add(
            "1. train peak RSS: ours / seed (full arch; seed estimated)",
            m["ours"] / seed_est,
            f"{m['ours']:.2f} GB measured / {seed_est:.2f} GB = ours + 4×{unet_gb:.2f} GB",
            0.40,
        )
        add(
            "1. train peak RSS: ours / seed (half-width UNet, both measured)",
            m["ours_half"] / m["seed_half"],
            f"{m['ours_half']:.2f} / {m['seed_half']:.2f} GB",
            0.40,
        )
        add(
            "1. train step time: ours / seed (half width, separate processes)",
            mem["ours_half"]["step_s"] / mem["seed_half"]["step_s"],
            f"{mem['ours_half']['step_s']:.1f} / {mem['seed_half']['step_s']:.1f} s",
        )
        add(
            "2. train peak RSS: shared / separate teacher",
            m["ours"] / m["separate_teacher"],
            f"{m['ours']:.2f} / {m['separate_teacher']:.2f} GB",
            0.75,
        )
        add(
            "4. train peak RSS: cached (encoders freed) / uncached",
            m["ours"] / m["uncached"],
            f"{m['ours']:.2f} / {m['uncached']:.2f} GB",
        )
        add(
            "4. train peak RSS: cached (encoders kept, train.py today) / uncached",
            m["cached_encoders_held"] / m["uncached"],
            f"{m['cached_encoders_held']:.2f} / {m['uncached']:.2f} GB",
        )
        add(
            "5. train peak RSS: checkpointing on / off",
            m["checkpointing"] / m["ours"],
            f"{m['checkpointing']:.2f} / {m['ours']:.2f} GB",
        )
    tr = r.get("train_time", {})
    tt, ts = tr.get("median_s"), tr.get("samples_s")
    if tt:
        add(
            "3. train step time: batched teacher (2B) / two passes",
            paired_ratio(ts, "ours", "two_pass", tt["ours"] / tt["two_pass"]),
            f"{tt['ours']:.1f} / {tt['two_pass']:.1f} s",
        )
        add(
            "4. train step time: cached / uncached",
            paired_ratio(ts, "ours", "uncached", tt["ours"] / tt["uncached"]),
            f"{tt['ours']:.1f} / {tt['uncached']:.1f} s",
            0.80,
        )
        add(
            "5. train step time: checkpointing on / off",
            paired_ratio(ts, "checkpointing", "ours", tt["checkpointing"] / tt["ours"]),
            f"{tt['checkpointing']:.1f} / {tt['ours']:.1f} s",
        )
    inf = r.get("inference")
    if inf:
        p, u, n = inf["pipeline_s"], inf["unet_s"], inf["steps"]
        ps, us = inf.get("pipeline_samples_s"), inf.get("unet_samples_s")
        add(
            f"6. s/image: distilled (w=1, fused) / base CFG, {n} steps",
            paired_ratio(ps, "lora_fused", "base_cfg", p["lora_fused"] / p["base_cfg"]),
            f"{p['lora_fused']:.1f} / {p['base_cfg']:.1f} s",
            0.56,
        )
        b1, b2 = "unet_b1_inference_mode", "unet_b2_inference_mode"
        add(
            "3. teacher pass alone: one 2B pass / two B passes (UNet forward, no grad)",
            paired_ratio(us, b2, b1, u[b2] / u[b1]) / 2,
            f"{u[b2]:.2f} / 2×{u[b1]:.2f} s",
        )
        add(
            "6. UNet pass: batch 1 / batch 2 (the many-steps limit of row 6)",
            paired_ratio(us, b1, b2, u[b1] / u[b2]),
            f"{u[b1]:.2f} / {u[b2]:.2f} s",
            0.56,
        )
        add(
            "7. s/image: LoRA unfused / fused",
            paired_ratio(ps, "lora_unfused", "lora_fused", p["lora_unfused"] / p["lora_fused"]),
            f"{p['lora_unfused']:.1f} / {p['lora_fused']:.1f} s",
        )
        add(
            "7. s/image: LoRA fused / base UNet alone (both w=1)",
            paired_ratio(ps, "lora_fused", "base_w1", p["lora_fused"] / p["base_w1"]),
            f"{p['lora_fused']:.1f} / {p['base_w1']:.1f} s",
            1.05,
        )
        for key, label in (
            ("unet_b1_no_grad", "no_grad instead of inference_mode"),
            ("unet_b1_channels_last", "channels_last"),
            ("unet_b1_flush_denormal", "set_flush_denormal(True)"),
            ("unet_b1_compiled", f"torch.compile (compile took {inf.get('compile_s') or 0:.0f} s)"),
        ):
            if key in u:
                add(
                    f"8. UNet pass: {label} / default",
                    paired_ratio(us, key, b1, u[key] / u[b1]),
                    f"{u[key]:.2f} / {u[b1]:.2f} s",
                )
    return rows


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| row | ratio (values) | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="timings at 128 px, 4 inference steps, 3 rounds (≈13 min here)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline instead of SD-2.1-base (seconds)")
    p.add_argument("--in_process", action="store_true", help="no subprocesses (no memory figures); for tests")
    p.add_argument("--only", default=None, help="comma list of memory,train_time,inference")
    p.add_argument("--mem_resolution", type=int, default=None, help="image size of the memory cases (default 256)")
    p.add_argument(
        "--resolution", type=int, default=None, help="image size of the timed training steps (default 256; --quick 128)"
    )
    p.add_argument("--infer_resolution", type=int, default=None, help="inference image size (default: --resolution)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default 8; --quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 5; --quick 3)")
    p.add_argument(
        "--mem_steps", type=int, default=None, help="steps per full-width memory case (default 2; --quick 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="OMP_NUM_THREADS of the worker processes (default: $OMP_NUM_THREADS or 1)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile(unet) (compiling takes minutes)")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--from_json", default=None, help="only print the table of a saved --out file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_args", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.worker:  # a subprocess: one measurement, one RESULT line
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        fns = {"memory": worker_memory, "train_time": worker_train_time, "inference": worker_inference}
        print("RESULT " + json.dumps(fns[args.worker](**json.loads(args.worker_args))), flush=True)
        return {}
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        results["rows"] = ratio_rows(results)
        print(format_table(results["rows"]))
        return results
    plan = make_plan(args)
    if plan.in_process:
        torch.set_num_threads(plan.threads)
    started = time.perf_counter()
    results = run_all(plan)
    results["total_s"] = time.perf_counter() - started
    results["versions"] = {"torch": torch.__version__, **_versions()}
    results["rows"] = ratio_rows(results)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(strict_json(results, indent=2))  # standard JSON: a non-finite figure is null
    print(format_table(results["rows"]))
    print(
        f"\n{plan.arch}, memory cases {plan.mem_resolution} px ({plan.mem_steps} step(s)), "
        f"timed training steps {plan.train_resolution} px, "
        f"inference {plan.infer_resolution} px / {plan.infer_steps} steps, "
        f"{plan.rounds} rounds, OMP_NUM_THREADS={plan.threads}; total {results['total_s']:.0f} s"
    )
    return results


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {m.__name__: m.__version__ for m in (diffusers, transformers, peft, accelerate)}


if __name__ == "__main__":
    main()

"""Which number format a model runs in, decided per machine.

`decide(requested, device, quantize, source)` -> `Precision(dtype, reason, quantize)`:

- an explicit `model.dtype` (float32, bfloat16, float16 and their short names) is used as given;
- `auto` is overridden by the environment variable `RECALIGN_DTYPE` (e.g. `RECALIGN_DTYPE=float32`);
- `auto` on CUDA: bfloat16;
- `auto` for the `tiny-random` test model: float32 on every machine (tests must not depend on the CPU);
- `auto` with `model.quantize: int8`: float32 (dynamic int8 quantisation takes float32 activations);
- `auto` on a CPU: float32 for now (`AUTO_CPU_BF16` is off: scored in bfloat16, a trained TALLRec adapter lost
  0.012 test AUC, above the 0.003 tolerance; docs/benchmarks-llm.md). With it on: bfloat16 where the CPU
  computes it natively (flag avx512_bf16 or amx_bf16 in /proc/cpuinfo) AND a model-shaped bfloat16 matmul
  measured on this machine beats float32 by a margin; float32 otherwise. The measurement runs once per CPU
  model + flags + torch version and is cached in `$RECALIGN_HOME/precision.json`; a CPU without the flags is
  never measured. The reason names the native flag either way.

Without a native bf16 unit, torch emulates bfloat16 matmuls and they run several times slower than float32;
with one, they run several times faster. Hence the flag check and the measurement.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from recalign.errors import InputError

ENV = "RECALIGN_DTYPE"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
QUANTIZE = ("none", "int8")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# a model-shaped matmul: 1,200 tokens through a [576 -> 1536] projection (SmolLM2-135M's MLP)
MATMUL_SHAPE = (1200, 576, 1536)
# bfloat16 must beat float32 by this factor before auto picks it (noise from other processes stays below it)
MIN_SPEEDUP = 1.3
# auto picks bfloat16 on a CPU with native bf16 only when this is on; off until bf16 scoring stays within the
# AUC tolerance (it did not with pure bfloat16 weights and residual stream)
AUTO_CPU_BF16 = False


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str
    quantize: str = "none"

    def as_dict(self) -> dict:
        return {"dtype": dtype_name(self.dtype), "reason": self.reason, "quantize": self.quantize}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name, key: str = "model.dtype") -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise InputError(f"{key}: unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_quantize(value) -> str:
    value = "none" if value is None else value
    if value not in QUANTIZE:
        raise InputError(f"model.quantize: unknown value {value!r}; use none or int8")
    return value


def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, CPU flags) from /proc/cpuinfo; ("", {}) where there is none (not Linux)."""
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "", flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def native_bf16_flag(flags) -> str | None:
    """The CPU flag that says bfloat16 matmuls run in hardware, or None."""
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def matmul_rate(kind: str, shape: tuple[int, int, int] = MATMUL_SHAPE, repeats: int = 5, rounds: int = 3) -> float:
    """GFLOP/s of one model-shaped product on this machine (best round): kind float32 | bfloat16 | int8
    (int8 = an nn.Linear quantised as `model.quantize: int8` does)."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator)
    if kind == "int8":
        layer = quantize_linear_layers(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)))
        run = lambda: layer(x)  # noqa: E731
    elif kind in ("float32", "bfloat16"):
        dtype = DTYPES[kind]
        a, b = x.to(dtype), torch.randn(k, n, generator=generator).to(dtype)
        run = lambda: a @ b  # noqa: E731
    else:
        raise ValueError(f"unknown kind {kind!r}")
    with torch.no_grad():
        run()
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(repeats):
                run()
            best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * m * k * n / best / 1e9


def _measure_bf16_speedup() -> dict:
    """float32 and bfloat16 matmul rates, interleaved so that load from other processes hits both alike."""
    fp32, bf16 = [], []
    for _ in range(2):
        fp32.append(matmul_rate("float32", rounds=2))
        bf16.append(matmul_rate("bfloat16", rounds=2))
    return {"float32_gflops": round(max(fp32), 1), "bfloat16_gflops": round(max(bf16), 1)}


def _cache_key(model: str, flags) -> str:
    digest = hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{model or 'unknown cpu'} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cache_path() -> Path:
    from recalign import assets

    return assets.home() / "precision.json"


def cpu_bf16_verdict(model: str, flags, measure: Callable[[], dict] = _measure_bf16_speedup) -> dict:
    """{"float32_gflops", "bfloat16_gflops", "speedup", "bfloat16": bool, "cached": bool} for this CPU,
    measured once and cached under $RECALIGN_HOME."""
    import json

    from recalign.io import atomic_write_json

    path, key = _cache_path(), _cache_key(model, flags)
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, dict) and {"speedup", "bfloat16"} <= set(entry):
        return {**entry, "cached": True}
    rates = measure()
    speedup = rates["bfloat16_gflops"] / max(rates["float32_gflops"], 1e-9)
    entry = {**rates, "speedup": round(speedup, 2), "bfloat16": speedup >= MIN_SPEEDUP,
             "measured": time.strftime("%Y-%m-%d")}
    table[key] = entry
    try:
        atomic_write_json(path, table)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return {**entry, "cached": False}


def cpu_decision(model: str, flags, measure: Callable[[], dict] = _measure_bf16_speedup) -> Precision:
    """`auto` on a CPU: float32 without a native bf16 flag (nothing measured), else the cached verdict."""
    flag = native_bf16_flag(flags)
    name = model or "this CPU"
    if flag is None:
        return Precision(torch.float32, f"auto: {name} has no native bfloat16 ({'/'.join(NATIVE_BF16_FLAGS)} "
                                        "absent) -> float32")
    verdict = cpu_bf16_verdict(model, flags, measure)
    how = "cached measurement" if verdict["cached"] else "measured now"
    speed = (f"bfloat16 matmul {verdict['speedup']:.1f}x float32 ({verdict['bfloat16_gflops']:.0f} vs "
             f"{verdict['float32_gflops']:.0f} GFLOP/s, {how})")
    if verdict["bfloat16"]:
        return Precision(torch.bfloat16, f"auto: {name} has {flag}; {speed} -> bfloat16")
    return Precision(torch.float32, f"auto: {name} has {flag} but {speed} is below {MIN_SPEEDUP}x -> float32")


@lru_cache(maxsize=None)
def _this_cpu() -> Precision:
    return cpu_decision(*cpu_info())


def with_env_dtype(config: dict) -> dict:
    """The run config with `model.dtype: auto` replaced by RECALIGN_DTYPE's value when it is set: config.yaml
    records the dtype the run used, and continuing it without (or with another) override is refused as a
    changed config instead of mixing precisions."""
    model, env = config.get("model"), os.environ.get(ENV, "").strip()
    if not (isinstance(model, dict) and model.get("dtype") == "auto" and env and env != "auto"):
        return config
    parse_dtype(env, key=ENV)
    return {**config, "model": {**model, "dtype": env}}


def decide(requested: str = "auto", device: torch.device | str = "cpu", quantize: str | None = "none",
           source: str | None = None) -> Precision:
    """The dtype a model runs in and a one-line reason (see the module docstring)."""
    from recalign.llm.loading import TINY_NAME

    device = torch.device(device)
    quantize = parse_quantize(quantize)
    if quantize == "int8" and device.type != "cpu":
        raise InputError(f"model.quantize: int8 (dynamic quantisation) runs on the CPU only, not on {device}")
    if quantize == "int8" and not torchao_available():
        raise InputError("model.quantize: int8 needs the torchao package (pip install torchao==0.18.0)")
    env = os.environ.get(ENV, "").strip()
    if requested != "auto":
        chosen = Precision(parse_dtype(requested), f"model.dtype: {requested}", quantize)
    elif env and env != "auto":
        chosen = Precision(parse_dtype(env, key=ENV), f"{ENV}={env} overrides model.dtype: auto", quantize)
    elif quantize == "int8":
        return Precision(torch.float32, "auto with model.quantize: int8 -> float32 activations, int8 linear layers",
                         quantize)
    elif device.type == "cuda":
        return Precision(torch.bfloat16, "auto: CUDA -> bfloat16", quantize)
    elif source == TINY_NAME:
        return Precision(torch.float32, f"auto: the {TINY_NAME} test model runs in float32 on every machine",
                         quantize)
    elif device.type == "cpu" and not AUTO_CPU_BF16:
        model, flags = cpu_info()
        flag = native_bf16_flag(flags)
        native = (f"{model or 'this CPU'} has {flag} (native bfloat16), but auto keeps float32 until bfloat16 "
                  "scores match float32's; model.dtype: bfloat16 uses it") if flag else \
            f"{model or 'this CPU'} has no native bfloat16"
        return Precision(torch.float32, f"auto: float32 ({native})", quantize)
    elif device.type == "cpu":
        return Precision(_this_cpu().dtype, _this_cpu().reason, quantize)
    else:
        return Precision(torch.float32, f"auto: {device.type} -> float32", quantize)
    if quantize == "int8" and chosen.dtype != torch.float32:
        raise InputError(f"model.quantize: int8 needs float32 activations, but the dtype is {dtype_name(chosen.dtype)} "
                         f"({chosen.reason}); use float32 or auto")
    return chosen


def quantize_linear_layers(module: torch.nn.Module) -> torch.nn.Module:
    """Quantise every nn.Linear inside `module` to int8 (in place): int8 weights with one scale per output
    channel, activations quantised to int8 per token at run time (torchao's
    `Int8DynamicActivationInt8WeightConfig`).

    Not torch's own `quantize_dynamic`: it is deprecated in favour of torchao, and its per-tensor activation
    scale is ruined by the few huge activations LLMs carry (on SmolLM2 with a TALLRec adapter its Yes/No scores
    correlated 0.2 with float32's; torchao's per-token scales: 0.95)."""
    if not torchao_available():
        raise InputError("model.quantize: int8 needs the torchao package (pip install torchao==0.18.0)")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return module


def torchao_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return False
    quiet_import("torchao.quantization")
    return True


def quiet_import(name: str):
    """Import a module whose import chatters: torchao logs a warning per CUDA-only extension it cannot load on
    a CPU build (and torch one per enum torchao registers); peft imports torchao when it is installed. torch
    re-initialises its loggers' levels meanwhile, so only the global switch holds."""
    import importlib
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    finally:
        logging.disable(previous)

"""Finished run directories -> served models.

Loading a run never runs code from it: `config.yaml` is read with `yaml.safe_load`, `metrics.json` with
`json`, CF weights and slot modules are safetensors states (`recalign.io.load_state`, never unpickled),
adapters are peft folders whose weights must be `adapter_model.safetensors` (a pickled `adapter_model.bin`
is refused). What is read is checked: the run is finished (`metrics.json`), its method is one that can be
served, its dataset loads and has the sizes the weights were trained on, its weights fit the model its
config builds. Anything else is an InputError naming the run directory and the reason (one line;
`recalign serve` exits 2 before it listens).

What each method's finished run provides (and what serving reads):
  CF models   checkpoints/model.safetensors (`CFModel.checkpoint()`: name, sizes, params, weights)
  tallrec     checkpoints/adapter-seedN/ (the seed with the best valid AUC in metrics.json's per_seed)
  icl         nothing but config.yaml (the base model and the prompt)
  collm       step1_adapter/ (or step1.init_from), checkpoints/cf-MODEL.safetensors (the CF trainer's state:
              its best weights), checkpoints/collm-slots.safetensors (the CIE)
  bigrec      checkpoints/adapter/, the catalogue embeddings (grounding cache, recomputed when missing)
No run saves its id maps: users and items are mapped by reloading the run's dataset (config.yaml's
`data:` section and the dataset named in metrics.json) -- dense ids are the sorted raw ids, so the same
files give the same ids. A dataset that changed since training is refused: its fingerprint
(`Dataset.fingerprint`, recorded in metrics.json) differs, or, for runs from before the fingerprint was
recorded, its sizes no longer match the saved weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recalign.errors import InputError
from recalign.runs import read_metrics_file
from recalign.serve.models import Catalog, CFServed, GeneratorServed, ServedModel, YesNoServed

YES_NO = ("tallrec", "icl", "collm")
GENERATORS = ("bigrec",)


@dataclass
class LoadOptions:
    quantize: str | None = None  # overrides model.quantize of LLM runs (none | int8)
    dtype: str | None = None  # overrides model.dtype
    device: str | None = None  # overrides model.device
    max_batch: int = 32  # micro-batch size (rows per forward pass)
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    rerank: int = 50  # candidates a Yes/No model re-ranks for /recommend when the request gives none
    _catalogs: dict = field(default_factory=dict)


@dataclass
class RunInfo:
    path: Path
    method: str
    dataset: str
    config: dict
    metrics: dict

    def fail(self, why: str) -> InputError:
        return InputError(f"{self.path}: {why}")


def supported() -> list[str]:
    from recalign.cf import MODELS

    return sorted(MODELS) + list(YES_NO) + list(GENERATORS)


def read_run(path: str | Path) -> RunInfo:
    """config.yaml + metrics.json of a finished run, checked (no model is loaded)."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory (serve takes finished run directories)")
    config_path, metrics_path = path / "config.yaml", path / "metrics.json"
    if not config_path.is_file():
        raise InputError(f"{path}: not a run directory (no config.yaml)")
    if not metrics_path.is_file():
        raise InputError(f"{path}: an unfinished run (no metrics.json); finish it with its `recalign run` command")
    try:
        text = config_path.read_text(encoding="utf-8")
        config = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{config_path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    metrics = read_metrics_file(metrics_path)
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise InputError(f"{config_path}: not a recalign run config (a mapping with a data: section)")
    method, dataset = metrics["method"], metrics["dataset"]
    last = text.rstrip("\n").rpartition("\n")[2]
    if last.startswith("# run: "):
        origin_method, _, origin_dataset = last[len("# run: "):].partition(" on ")
        if origin_method != method:
            raise InputError(f"{path}: config.yaml is a run of {origin_method}, metrics.json of {method}")
    return RunInfo(path, method, dataset, config, metrics)


def load_runs(paths, options: LoadOptions | None = None) -> list[ServedModel]:
    """Every run, or an InputError for the first that cannot be served (models loaded before it are freed
    with it: nothing is left half-up)."""
    options = options or LoadOptions()
    if not paths:
        raise InputError("serve: name at least one finished run directory")
    infos = [read_run(p) for p in paths]  # cheap checks of every run before any model is loaded
    seen: set[Path] = set()
    for info in infos:
        if info.path.resolve() in seen:
            raise info.fail("named twice; serve each run once")
        seen.add(info.path.resolve())
        if info.method not in supported():
            raise info.fail(f"a {info.method} run cannot be served (servable methods: {', '.join(supported())})")
    names: dict[str, int] = {}
    models = []
    for info in infos:
        base = info.path.resolve().name or "run"
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}-{names[base]}"
        models.append(load_run(info, name, options))
    return models


def load_run(info: RunInfo, name: str, options: LoadOptions) -> ServedModel:
    from recalign.cf import MODELS

    catalog = _catalog(info, options)
    trained_on = info.metrics.get("dataset_fingerprint")  # absent in runs from before it was recorded
    if trained_on is not None and trained_on != catalog.ds.fingerprint():
        raise info.fail(f"its dataset {info.dataset!r} changed since the run was trained (the fingerprint in "
                        "metrics.json differs from the files now on disk), so its ids would name other users "
                        "and items; restore the files or train the run again")
    common = dict(name=name, path=info.path, method=info.method, dataset=info.dataset, config=info.config,
                  metrics=info.metrics, catalog=catalog)
    try:
        if info.method in MODELS:
            return _load_cf(info, common)
        if info.method in ("tallrec", "icl"):
            return _load_tallrec(info, common, options)
        if info.method == "collm":
            return _load_collm(info, common, options)
        return _load_bigrec(info, common, options)
    except InputError as exc:
        message = str(exc)
        raise InputError(message if str(info.path) in message else f"{info.path}: {message}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise info.fail(f"config.yaml or a checkpoint does not have what a {info.method} run saves "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


# ------------------------------------------------------------------------------------------- dataset
def _catalog(info: RunInfo, options: LoadOptions) -> Catalog:
    from recalign.data import canonical_dataset, load_dataset

    # data.domain is only the prompts' noun (each run's own, read from its config): runs that differ in it
    # share one catalogue, loaded with the dataset's own noun
    data = {k: v for k, v in info.config["data"].items() if k != "domain"}
    key = (canonical_dataset(info.dataset), json.dumps(data, sort_keys=True, default=str))  # however it was spelt
    if key not in options._catalogs:
        try:
            ds = load_dataset(info.dataset, fmt=data.get("format"), like_threshold=data.get("like_threshold"),
                              k_core_users=data.get("k_core_users", 0), k_core_items=data.get("k_core_items", 0))
        except InputError as exc:
            raise info.fail(f"cannot load its dataset {info.dataset!r} ({exc})") from None
        options._catalogs[key] = Catalog(ds, key)
    return options._catalogs[key]


def _noun(cfg: dict, ds) -> str:
    """The run's prompt noun, as `RunContext.noun` gave it in training (the catalogue carries the dataset's own)."""
    return cfg["data"].get("domain") or ds.domain or "item"


def _checkpoint(info: RunInfo, name: str) -> Any:
    from recalign.runs import RunDir

    state = RunDir(info.path).load_checkpoint(name)  # safetensors; a legacy pickle is refused, never loaded
    if state is None:
        raise info.fail(f"checkpoints/{name}.safetensors is missing (a finished {info.method} run saves it)")
    return state


def _adapter_dir(info: RunInfo, path: Path) -> Path:
    """A peft adapter folder whose config is JSON and whose weights are safetensors."""
    config = path / "adapter_config.json"
    if not config.is_file():
        raise info.fail(f"{path.relative_to(info.path) if path.is_relative_to(info.path) else path}: "
                        "no LoRA adapter there (adapter_config.json missing)")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{config}: unreadable ({exc})") from None
    if not isinstance(parsed, dict) or parsed.get("peft_type") != "LORA":
        raise InputError(f"{config}: not a LoRA adapter config (peft_type {parsed.get('peft_type') if isinstance(parsed, dict) else None!r})")
    if not (path / "adapter_model.safetensors").is_file():
        pickled = " (only a pickled adapter_model.bin, which is never loaded)" if (path / "adapter_model.bin").exists() else ""
        raise InputError(f"{path}: adapter_model.safetensors is missing{pickled}")
    return path


def _backbone(info: RunInfo, options: LoadOptions, adapter: Path | None = None):
    from recalign.llm import Backbone

    section = dict(info.config["model"])
    for key in ("quantize", "dtype", "device"):
        if getattr(options, key) is not None:
            section[key] = getattr(options, key)
    try:
        backbone = Backbone.from_config(section)
    except InputError:
        raise
    except Exception as exc:  # transformers / safetensors errors of a missing or broken model
        raise info.fail(f"cannot load its model {section.get('name')!r} "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if adapter is not None:
        _load_adapter(info, backbone, adapter)
    return backbone


def _load_adapter(info: RunInfo, backbone, adapter: Path) -> None:
    import warnings

    try:
        with warnings.catch_warnings():  # peft calls a transformers property transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            backbone.load_adapter(adapter)
    except InputError:
        raise
    except Exception as exc:  # shapes of another base model, a truncated file
        why = f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        if type(exc).__name__ == "SafetensorError":
            raise info.fail(f"{adapter}/adapter_model.safetensors is not a readable safetensors file {why}") from None
        raise info.fail(f"the adapter {adapter} does not fit model {info.config['model'].get('name')!r} {why}") from None


def _llm_common(options: LoadOptions) -> dict:
    return dict(max_batch=options.max_batch, max_wait_ms=options.max_wait_ms, rerank=options.rerank)


# ------------------------------------------------------------------------------------------------ CF
def _load_cf(info: RunInfo, common: dict) -> CFServed:
    from recalign.cf import load_model

    state = _checkpoint(info, "model")
    model = load_model(state)
    catalog = common["catalog"]
    if (model.n_users, model.n_items) != (catalog.n_users, catalog.n_items):
        raise info.fail(f"the model was trained on {model.n_users} users x {model.n_items} items, the dataset "
                        f"{info.dataset!r} now has {catalog.n_users} x {catalog.n_items} (it changed since the run)")
    if model.name != info.method:
        raise info.fail(f"checkpoints/model.safetensors holds a {model.name} model, the run is {info.method}")
    served = CFServed(**common, model=model, info={"protocol": info.config.get("protocol", "loo")})
    served.train_user_counts, served.train_item_counts = train_counts(info.config, catalog.ds)
    return served


def train_counts(config: dict, ds) -> tuple[np.ndarray, np.ndarray]:
    """Training interactions per user and per item of a CF run (the router's warm/cold rule): leave-one-out
    = all but each user's last two; ctr = the interactions up to the last training sample's time."""
    if config.get("protocol", "loo") == "ctr":
        from recalign.tasks.ctr import tallrec_protocol

        ctr = config["ctr"]
        samples = tallrec_protocol(ds, {**ctr, "valid_size": 0, "test_size": 0},
                                   liked_history_only=bool(ctr.get("liked_history_only", False)))
        cutoff = samples.train_all["timestamp"].max()
        train = ds.interactions[ds.interactions["timestamp"] <= cutoff]
    else:
        from recalign.tasks.next_item import leave_one_out

        train = leave_one_out(ds.interactions)[0]
    return (np.bincount(train["user"].to_numpy(np.int64), minlength=ds.n_users),
            np.bincount(train["item"].to_numpy(np.int64), minlength=ds.n_items))


# ------------------------------------------------------------------------------------ TALLRec / ICL
def _best_seed(info: RunInfo) -> int:
    """The training seed with the best valid AUC (metrics.json per_seed), else the config's seed."""
    best, best_auc = int(info.config.get("seed", 0)), None
    for row in info.metrics.get("per_seed") or []:
        auc = (row.get("valid") or {}).get("auc") if isinstance(row, dict) else None
        if isinstance(auc, (int, float)) and auc == auc and (best_auc is None or auc > best_auc):
            best, best_auc = int(row["seed"]), auc
    return best


def _load_tallrec(info: RunInfo, common: dict, options: LoadOptions) -> YesNoServed:
    import pandas as pd

    cfg = info.config
    ds = common["catalog"].ds
    extra: dict = {}
    adapter = None
    if info.method == "tallrec":
        if (cfg.get("cross") or {}).get("domains"):
            raise info.fail("a cross-domain TALLRec run (cross.domains) holds one adapter per domain; serve a "
                            "single-domain run")
        seed = _best_seed(info)
        adapter = _adapter_dir(info, info.path / "checkpoints" / f"adapter-seed{seed}")
        extra["adapter"] = f"checkpoints/adapter-seed{seed}"
    backbone = _backbone(info, options, adapter)
    prompt = cfg["prompt"]
    noun = _noun(cfg, ds)
    if info.method == "tallrec":
        from recalign.methods.tallrec import prompts_of

        def to_prompts(frame):
            return prompts_of(backbone, prompt, ds, frame, noun)
    else:
        from recalign.methods.icl import prompter_for
        from recalign.tasks.text import frame_fields

        prompter = prompter_for(backbone, prompt)

        def to_prompts(frame):
            return prompter.render_all(frame_fields(frame, ds.titles(), noun))

    def render(rows):
        frame = pd.DataFrame({"user": [r[0] for r in rows], "history": [r[1] for r in rows],
                              "history_labels": [r[2] for r in rows], "item": [r[3] for r in rows]})
        return to_prompts(frame), None

    return YesNoServed(**common, backbone=backbone, render=render, yes=prompt["yes"], no=prompt["no"],
                       history_len=int(cfg["samples"]["history_len"]), liked_only=False,
                       info={**extra, "model": cfg["model"]["name"]}, **_llm_common(options))


# ------------------------------------------------------------------------------------------- CoLLM
def _load_collm(info: RunInfo, common: dict, options: LoadOptions) -> YesNoServed:
    import pandas as pd
    import torch

    from recalign.cf import load_model, model_class
    from recalign.llm import CIE
    from recalign.methods import collm

    cfg = info.config
    ds = common["catalog"].ds
    noun = _noun(cfg, ds)
    # the CF model: CoLLM keeps it only as its trainer's checkpoint (best weights + sizes from the config)
    cf_name = cfg["cf"]["model"]
    params = dict(cfg["cf"]["params"])
    if model_class(cf_name).kind == "sequential" and "max_len" not in params:
        params["max_len"] = cfg["data_protocol"]["history_len"]  # as collm.train_cf sets it
    saved = _checkpoint(info, f"cf-{cf_name}")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise info.fail(f"checkpoints/cf-{cf_name}.safetensors is not a CF trainer checkpoint")
    weights = saved["state"].get("best_state") or saved.get("model_state")
    cf = load_model({"name": cf_name, "n_users": ds.n_users, "n_items": ds.n_items, "params": params,
                     "state": weights})
    # step 1's LoRA adapter: saved in the run, or read from step1.init_from
    adapter, extra = info.path / "step1_adapter", {}
    if not adapter.is_dir():
        if cfg["step1"].get("init_from"):
            adapter = Path(collm.step1_adapter(cfg["step1"]["init_from"]))
            extra["adapter_from"] = str(adapter)
        elif int(cfg["step1"].get("epochs", 0)) > 0:
            raise info.fail("step1_adapter/ is missing (a finished CoLLM run with step1.epochs > 0 saves it)")
        else:
            adapter = None
    backbone = _backbone(info, options, _adapter_dir(info, adapter) if adapter is not None else None)
    pcfg = cfg["prompt"]
    slots = (pcfg["user_slot"], pcfg["item_slot"])
    cie = CIE(cf.item_embeddings().shape[1], backbone.hidden_size, cfg["cie"]["tokens"], cfg["cie"]["hidden_mult"])
    module = collm.CoLLMSlots(cf, cie, *slots, tune_cf=bool(cfg["cf"]["tune"]))
    state = _checkpoint(info, "collm-slots")
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise info.fail(f"checkpoints/collm-slots.safetensors does not fit the CIE its config builds "
                        f"({' '.join(str(exc).split())[:200]})") from None
    module.eval()

    def render(rows):
        frame = pd.DataFrame({"user": [r[0] for r in rows], "history": [r[1] for r in rows],
                              "item": [r[3] for r in rows]})
        prompts = collm.prompts_of(backbone, pcfg, "ids", {"rows": frame}, ds, noun, require=slots)["rows"]
        with torch.no_grad():
            fills = module(frame)
        return prompts, fills

    return YesNoServed(**common, backbone=backbone, render=render, yes=pcfg["yes"], no=pcfg["no"],
                       history_len=int(cfg["data_protocol"]["history_len"]), liked_only=True,
                       info={**extra, "model": cfg["model"]["name"], "cf_model": cf_name}, **_llm_common(options))


# ------------------------------------------------------------------------------------------- BIGRec
def _load_bigrec(info: RunInfo, common: dict, options: LoadOptions) -> GeneratorServed:
    import pandas as pd
    import torch

    from recalign import assets
    from recalign.eval.grounding import CatalogueCache, aggregate_beams, clean_generation, model_fingerprint
    from recalign.llm import fill
    from recalign.methods import bigrec

    cfg = info.config
    ds = common["catalog"].ds
    if (options.quantize or cfg["model"].get("quantize", "none")) not in (None, "none"):
        raise info.fail("BIGRec grounds with the base model without its adapter, which int8 (merging the "
                        "adapter into quantised weights) cannot give; serve it without --quantize")
    adapter = _adapter_dir(info, info.path / "checkpoints" / "adapter")
    backbone = _backbone(info, options)
    g = cfg["grounding"]
    base_id = model_fingerprint(backbone.causal_lm, cfg["model"]["name"])  # before the adapter, as the run
    texts = [fill(g["item_text"], "grounding.item_text", title=t) for t in ds.titles()]
    cache = CatalogueCache(g["cache_dir"] or (assets.home() / "grounding"))
    catalogue, cached = cache.get(texts, lambda batch: backbone.embed(batch, pooling=g["pooling"],
                                                                      batch_size=int(g["batch_size"]), adapter=False),
                                  base_id, extra=f"pooling={g['pooling']}")
    _load_adapter(info, backbone, adapter)
    p, gen = cfg["prompt"], cfg["generate"]
    noun = _noun(cfg, ds)

    def generate(histories):
        frame = pd.DataFrame({"history": list(histories)})
        prompts = bigrec.render_prompts(backbone, frame, p, ds.titles(), noun)
        out = backbone.generate(prompts, num_beams=int(gen["beams"]), max_new_tokens=int(gen["max_new_tokens"]),
                                batch_size=options.max_batch)
        per_beam = bigrec.ground(backbone, out.texts, catalogue, g)
        distances = aggregate_beams(per_beam, torch.as_tensor(out.scores), g["beams"])
        return distances.numpy(), [clean_generation(row[0]) for row in out.texts]

    return GeneratorServed(**common, backbone=backbone, generate=generate,
                           history_len=int(cfg["samples"]["history_len"]),
                           info={"model": cfg["model"]["name"], "adapter": "checkpoints/adapter",
                                 "catalogue_cached": bool(cached), "beams": int(gen["beams"])},
                           **_llm_common(options))

"""RecBole 1.2.1 side of `bench/cf.py --peer`. Runs INSIDE the throwaway RecBole venv (never imports
recalign): trains one RecBole model on an atomic .inter file with leave-one-out by time, full ranking,
history masked, and prints one JSON line with metrics and timings.

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 /tmp/recbole-venv/bin/python bench/cf_recbole.py \
        --model SASRec --data-dir DIR --dataset ml100k-loo --budget-minutes 15 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

SEQUENTIAL = {"SASRec", "GRU4Rec", "Caser"}
MEMORY = {"Pop", "ItemKNN"}


class BudgetSpent(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="ml100k-loo")
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    torch.set_num_threads(int(os.environ.get("RECBOLE_THREADS", "2")))
    work = tempfile.mkdtemp(prefix="recbole-")
    config_dict = {
        "data_path": args.data_dir, "checkpoint_dir": os.path.join(work, "saved"),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [10, 20], "valid_metric": "NDCG@10",
        "epochs": args.epochs, "stopping_step": 10, "eval_step": 1,
        "train_batch_size": 2048, "eval_batch_size": 4096, "seed": args.seed, "reproducibility": True,
        "show_progress": False, "worker": 0, "use_gpu": False, "log_wandb": False,
    }
    if args.model in SEQUENTIAL:
        config_dict.update({"train_neg_sample_args": None, "loss_type": "CE"})
    config = Config(model=args.model, dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    t = time.perf_counter()
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    init_seconds = time.perf_counter() - t  # ItemKNN computes its whole similarity matrix here
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    epoch_seconds, valid_seconds = [], []
    started = time.perf_counter()
    budget = 60.0 * args.budget_minutes
    original_train, original_valid = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*a, **k):
        t = time.perf_counter()
        out = original_train(*a, **k)
        epoch_seconds.append(time.perf_counter() - t)
        return out

    def timed_valid(*a, **k):
        t = time.perf_counter()
        out = original_valid(*a, **k)
        valid_seconds.append(time.perf_counter() - t)
        return out

    def callback(epoch_idx, valid_score):
        elapsed = time.perf_counter() - started
        next_epoch = (epoch_seconds[-1] if epoch_seconds else 0) + (valid_seconds[-1] if valid_seconds else 0)
        if elapsed + next_epoch > budget:
            raise BudgetSpent()

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    bounded = False
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=callback)
    except BudgetSpent:
        bounded = True
    t = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    test_seconds = time.perf_counter() - t
    stopped_early = not bounded and trainer.cur_step >= trainer.stopping_step
    result = {
        "model": args.model,
        "test": {k.lower().replace("hit", "hr"): float(v) for k, v in test_result.items()},
        "best_valid_ndcg@10": float(trainer.best_valid_score),
        "epochs": len(epoch_seconds),
        "seconds_per_epoch": sorted(epoch_seconds)[len(epoch_seconds) // 2] if epoch_seconds else 0.0,
        "model_init_seconds": init_seconds,
        "epoch_seconds": epoch_seconds,
        "valid_eval_seconds": sorted(valid_seconds)[len(valid_seconds) // 2] if valid_seconds else 0.0,
        "test_eval_seconds": test_seconds,
        "bounded": bounded,
        "stopped": "time budget" if bounded else ("early stopping" if stopped_early else "epochs"),
        "budget_minutes": args.budget_minutes,
        "train_rows": len(train_data.dataset), "users": dataset.user_num - 1, "items": dataset.item_num - 1,
        "batch_size": 2048, "versions": {"recbole": __import__("recbole").__version__, "torch": torch.__version__},
    }
    if args.model in MEMORY:  # no real epochs: the fit is the model's construction plus one pass
        result["seconds_per_epoch"] += init_seconds
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: result[k] for k in ("model", "test", "epochs", "seconds_per_epoch", "stopped")}))


if __name__ == "__main__":
    sys.exit(main())

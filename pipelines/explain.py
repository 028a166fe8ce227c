"""DVC stage ``explain``: bulk-explain the evaluation images with the version just registered.

Runs ``ptame explain`` (Ray Data) with the pinned ``model_uri`` from ``reports/registered.json``
on ``data/prepared/eval``; output Parquet in ``data/explanations``.
"""

import json
import os
import sys
from pathlib import Path

from _stage import main

REGISTERED = Path("reports/registered.json")
INPUT = "data/prepared/eval"
OUT = "data/explanations"


def run(params) -> None:
    from ptame.cli import main as cli

    record = json.loads(REGISTERED.read_text())
    tracking = params["register.tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or record["tracking_uri"]
    x = params["explain"]
    argv = ["explain", "--model", record["model_uri"], "--tracking-uri", tracking, "--input", INPUT, "--output", OUT,
            "--batch-size", str(x["batch_size"]), "--topk", str(x["topk"]), "--view", x["view"], "--maps", x["maps"]]  # fmt: skip
    if x["concurrency"]:
        argv += ["--concurrency", str(x["concurrency"])]
    if x["use_gpu"]:
        argv.append("--use-gpu")
    if params["train.ray_address"]:
        argv += ["--address", params["train.ray_address"]]
    code = cli(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main(run)

"""DVC stage ``prepare``: image source -> Parquet shards in ``data/prepared/{train,eval,single}``.

``data.source: demo`` builds the embedded default (photos shipped by scikit-image and
scikit-learn); anything else is a folder, glob, ``.txt`` list or Parquet dataset (local or URI).
Unreadable images are skipped, logged and listed in ``reports/prepare.json``.
"""

import json
from pathlib import Path

from _stage import main, preprocessing

OUT = Path("data/prepared")
REPORT = Path("reports/prepare.json")


def run(params) -> None:
    from ptame.models import load_backbone
    from ptame.prepare import prepare_demo, prepare_source

    source = params["data.source"]
    shard_rows = params["data.shard_rows"]
    if source == "demo":
        demo = params["data.demo"]
        backbone = load_backbone(
            params["model.backbone"], pretrained=bool(params["model.pretrained"]), preprocessing=preprocessing(params)
        )
        report = prepare_demo(
            OUT, backbone,
            train_images=demo["train_images"], eval_images=demo["eval_images"], single_images=demo["single_images"],
            grid_fraction=demo["grid_fraction"], image_size=demo["image_size"],
            seed=demo["seed"], eval_seed=demo["eval_seed"], min_score=demo["min_score"],
            shard_rows=shard_rows,
        )  # fmt: skip
    else:
        report = prepare_source(
            source, OUT, eval_fraction=params["data.eval_fraction"], seed=params["data.split_seed"],
            shard_rows=shard_rows, max_images=params.get("data.max_images", None),
        )  # fmt: skip
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report.to_dict(), indent=2))


if __name__ == "__main__":
    main(run)

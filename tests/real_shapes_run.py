"""FLUX.1-dev's real shapes through the stages on their own Ray: a background piece (tests/background.py)
whose folders tests/test_real_shapes.py reads.

    python -m tests.real_shapes_run WORKDIR     # writes WORKDIR/result.json last

generate (one prompt) with the preset flux-dev-shapes, a hand-written critique with one region,
enhance, train (one step per phase with gradient checkpointing), `artaug fuse`, then the fused model
served by Ray Serve and asked for one image over HTTP. Each stage is its CLI command in this process,
on one local Ray; what the served request returned is saved beside the folders.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse on a cliff at dusk"
REGION = {"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a tall white lighthouse"}
SIDE = 256
# One optimizer step at flux-dev's learning rate (1e-4) moves bf16 weights by less than their rounding
# step: the run trains at 1e-2 so that the fused model visibly differs from the base. Rank 4, not 16:
# fusing costs one fp32 pass over each targeted weight per rank (lora/fuse.py), measured at ~20 s for
# rank 16 on 2 threads at these widths; the shapes that matter here are the widths, not the rank.
RANK = 4
TRAIN_SETTINGS = [f"train.learning_rate={0.01}", f"train.rank={RANK}", f"train.alpha={RANK}"]
PRESET = ["--preset", "flux-dev-shapes"]


def run_in_background(workdir: str, timeout_s: float = 1200) -> dict:
    """This module as a process of the background thread (HEAVY): the folders and the served answer."""
    from tests.background import HEAVY

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    with open(os.path.join(workdir, "console.log"), "w") as log:
        process = HEAVY.popen([sys.executable, "-m", "tests.real_shapes_run", workdir], env=env,
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        code = process.wait(timeout_s)
    result = os.path.join(workdir, "result.json")
    if code != 0 or not os.path.isfile(result):
        tail = Path(workdir, "console.log").read_text()[-3000:]
        raise RuntimeError(f"the real-shapes run exited {code}:\n{tail}")
    return json.loads(Path(result).read_text())


def _critique(root: str) -> None:
    """A critique stage output with one region for every generated image (no VLM at these shapes)."""
    from artaug import storage
    from artaug.rows import CRITIQUE
    from artaug.stages.contract import read_stage

    rows = read_stage(f"{root}/generate", columns=["prompt_id", "prompt", "seed", "round"]).to_pylist()
    critique = {"assessment": "", "rating": 5, "adjustments": [], "regions": [REGION],
                "rewritten_prompt": "", "rejected_regions": []}  # fmt: skip
    rows = [{**r, "status": "ok", "critique": json.dumps(critique), "backend": "test"} for r in rows]
    os.makedirs(f"{root}/critique")
    table = pa.Table.from_pylist([{n: r.get(n) for n in CRITIQUE.names} for r in rows], schema=CRITIQUE)
    pq.write_table(table, f"{root}/critique/part.parquet")
    storage.mark_complete(f"{root}/critique", {"rows": len(rows)})


def _served(fused: str, root: str) -> dict:
    """The fused model behind Ray Serve's HTTP proxy; one image asked for with a real HTTP client."""
    import requests
    from ray import serve

    from artaug.serve.app import build_app
    from artaug.serve.launch import resolve_config
    from tests.conftest import free_port

    port, app = free_port(), "artaug-real-shapes"
    cfg = resolve_config(preset="flux-dev-shapes", overrides=[
        f"model.source={fused}", f"serve.port={port}", f"serve.app_name={app}"])  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name=app, route_prefix="/")
        body = {"prompt": PROMPT, "seed": 3, "size": f"{SIDE}x{SIDE}", "steps": 2}
        answer = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body, timeout=300)
    finally:
        serve.shutdown()
    served = {"status": answer.status_code, "text": answer.text[:500] if answer.status_code != 200 else ""}
    if answer.status_code == 200:
        (data,) = answer.json()["data"]
        Path(root, "served.png").write_bytes(base64.b64decode(data["b64_json"]))
    return served


def main(workdir: str) -> None:
    import ray

    from artaug.cli import main as cli
    from artaug.config import load_config
    from artaug.layout import TrainOutput
    from artaug.models.flux_shapes import cached_flux_dev_shapes

    ray.init(num_cpus=4, include_dashboard=False)
    seconds = {}
    started = time.perf_counter()
    model = load_config("flux-dev-shapes").model
    model_folder = cached_flux_dev_shapes(model.cache_dir, model.tiny_seed)
    seconds["model"] = time.perf_counter() - started
    root = os.path.join(workdir, "stages")
    os.makedirs(root)
    Path(root, "prompts.txt").write_text(PROMPT + "\n")
    train, fused = f"{root}/train", f"{root}/fused"
    settings = [arg for setting in TRAIN_SETTINGS for arg in ("--set", setting)]
    commands = {
        "generate": ["generate", "--prompts", f"{root}/prompts.txt", "--out", root, *PRESET],
        "enhance": ["enhance", "--images", root, "--critiques", root, "--out", root, *PRESET],
        "train": ["train", "--pairs", f"{root}/enhance", "--out", train, *PRESET, *settings],
        "fuse": [
            "fuse",
            *PRESET,
            "--base",
            "flux-dev-shapes",
            "--lora",
            TrainOutput(train).lora,
            "--out",
            fused,
        ],
    }
    for name, command in commands.items():
        if name == "enhance":
            _critique(root)
        start = time.perf_counter()
        if cli(command) != 0:
            raise SystemExit(f"artaug {name} failed")
        seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    served = _served(fused, root)
    seconds["serve"] = time.perf_counter() - start
    result = {"root": root, "train": train, "fused": fused, "model": model_folder, "served": served,
              "seconds": {k: round(v, 1) for k, v in seconds.items()}}  # fmt: skip
    Path(workdir, "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])

"""The real-architecture zoo: prepare, ranges and export of the models users ship to ncnn.

    bash scripts/zoo_env.sh                                   # once: .venv-zoo (torch 2.14.1, timm, ultralytics)
    nice -n 10 .venv-zoo/bin/python benchmarks/zoo.py         # every model, one at a time
    nice -n 10 .venv-zoo/bin/python benchmarks/zoo.py --models resnet18 yolov8n --out zoo.json

Per model, in its own subprocess (a crash or a hang of one never stops the table; ``--timeout``
seconds each): build it with random weights, offline (torchvision ``weights=None``, timm
``pretrained=False``, ultralytics from its yaml), its BatchNorm statistics set on random data
(``--bn-warmup``, see :func:`warm_batchnorm`), ``prepare_qat(model, example, targets=...)`` on a
``[1, 3, S, S]`` example (the Trainer-less QAT start, the one QATCallback runs: the export
preflight and the measured int8 decisions), a few training-mode forwards on random data to set
the ranges, then ``lightning_ncnnqat.export``
with a held batch of random images. The table has: int8 / float layers of the plan, whether the
export completed (else the failed step, layer and the first line of its message), whether
report.json was written, the cosine of ncnn int8 vs the PyTorch QAT model on the held batch next
to the float32 floor (cosine of the same QAT model run in float64 vs float32: int8 cannot be
expected to agree better than float32 agrees with itself), the worst layer by isolated cosine
and the layers the int8 runtime computes wrongly (flagged).

Inputs are 224x224, except the ultralytics detection and pose models: 320, the smallest of the
sizes they are deployed at (640 / 320), and mobilevit_xxs: 256, timm's default. ``--size``
overrides all. ultralytics heads are exported in the form ultralytics' own ncnn export gives them
(``lightning_ncnnqat.qat.export_form``: single decoded output, one-to-many head of YOLOv10).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # zoo_table beside this file

from zoo_table import fault, table  # noqa: E402

# name -> (source, default input size)
MODELS: dict[str, tuple[str, int]] = {
    "resnet18": ("torchvision", 224),
    "resnet50": ("torchvision", 224),
    "mobilenet_v2": ("torchvision", 224),
    "mobilenet_v3_small": ("torchvision", 224),
    "mobilenet_v3_large": ("torchvision", 224),
    "efficientnet_b0": ("torchvision", 224),
    "shufflenet_v2_x1_0": ("torchvision", 224),
    "squeezenet1_1": ("torchvision", 224),
    "regnet_x_400mf": ("torchvision", 224),
    "resnext50_32x4d": ("torchvision", 224),
    "densenet121": ("torchvision", 224),
    "mnasnet1_0": ("torchvision", 224),
    "googlenet": ("torchvision", 224),
    "convnext_tiny": ("torchvision", 224),
    "mobilenetv3_large_100": ("timm", 224),
    "efficientnet_lite0": ("timm", 224),
    "ghostnet_100": ("timm", 224),
    "lcnet_050": ("timm", 224),
    "yolov8n": ("ultralytics", 320),
    "yolov8n-cls": ("ultralytics", 224),
    "resnet18d": ("timm", 224),
    "mobilevit_xxs": ("timm", 256),
    "levit_128s": ("timm", 224),
    "efficientvit_b0": ("timm", 224),
    "regnet_y_400mf": ("torchvision", 224),
    "yolov8n-pose": ("ultralytics", 320),
    "yolov10n": ("ultralytics", 320),
}
# the other ultralytics head forms (segment, oriented boxes, YOLO26's one-to-one head): run on request
EXTRA_MODELS: dict[str, tuple[str, int]] = {
    "yolov8n-seg": ("ultralytics", 320),
    "yolov8n-obb": ("ultralytics", 320),
    "yolo26n": ("ultralytics", 320),
    "yolo11n": ("ultralytics", 320),  # C2PSA attention (issue 18)
}
ALL_MODELS = {**MODELS, **EXTRA_MODELS}

# Nothing may reach the network: no hub, no telemetry, no update or font checks.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_VERBOSE": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# ----------------------------------------------------------------------------- child: one model
def build_model(name: str, source: str, workdir: Path) -> Any:
    """A randomly initialised model, built offline (no weight download is attempted)."""
    if source == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {"weights": None}
        if name == "googlenet":
            kwargs["init_weights"] = True  # what weights=None implies; silences torchvision's warning
        return torchvision.models.get_model(name, **kwargs)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    if source == "ultralytics":
        os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "ultralytics_cfg"))
        from ultralytics.utils import SETTINGS

        off = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")}
        dirs = {k: str(workdir / k) for k in ("datasets_dir", "weights_dir", "runs_dir")}
        SETTINGS.update({k: v for k, v in {**off, **dirs}.items() if k in SETTINGS})  # no telemetry, nothing in the repo
        from ultralytics.nn.tasks import ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel

        builders = {"yolov8n": DetectionModel, "yolov10n": DetectionModel, "yolo26n": DetectionModel, "yolo11n": DetectionModel,
                    "yolov8n-pose": PoseModel, "yolov8n-seg": SegmentationModel, "yolov8n-obb": OBBModel,
                    "yolov8n-cls": ClassificationModel}
        if name in builders:
            return builders[name](f"{name}.yaml", verbose=False)
    raise ValueError(f"unknown model {name!r} (source {source!r})")


def _tensors(v: Any) -> list:
    """Every tensor of a (nested) model output, in order."""
    import torch

    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, dict):
        return [t for k in v for t in _tensors(v[k])]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _cosine(a: list, b: list) -> float:
    import torch

    x = torch.cat([t.detach().double().reshape(-1) for t in a])
    y = torch.cat([t.detach().double().reshape(-1) for t in b])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def float32_floor(model: Any, held: Any) -> float:
    """Cosine of the QAT model in float64 vs float32 on ``held`` (eval mode); the worst output's.

    The same floor the export measures (``export.output_floor.float64_outputs``: quantization
    unchanged, every convolution, matmul and float op in float64), so the figures agree.
    """
    import torch

    from lightning_ncnnqat.conversion.model_io import model_io, torch_outputs
    from lightning_ncnnqat.verification.output_floor import float64_outputs

    m32 = model.eval()
    io = model_io(m32, held[:1])
    ref = torch_outputs(m32, io, [held])
    got = float64_outputs(m32, io, [held])
    return min(_cosine([torch.from_numpy(a)], [torch.from_numpy(b)]) for a, b in zip(got, ref))


def warm_batchnorm(model: Any, size: int, batches: int, g: Any) -> int:
    """Give every BatchNorm the statistics of the data (cumulative average over ``batches``).

    A freshly initialised BN holds mean 0 / var 1 whatever its input, and prepare_qat folds (and
    freezes) those statistics: deep random-init nets then shrink their activations block after
    block (torchvision efficientnet_b0 ends near 1e-15, input scales near 1e15), a regime no
    trained model is in. A trained model's BN matches its data; this is the cheap equivalent.
    Returns the number of BatchNorm layers warmed.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the mean over the warm-up batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, size, size, generator=g))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return len(bns)


def _first_line(s: str, n: int = 200) -> str:
    line = (s or "").strip().splitlines()[0] if (s or "").strip() else ""
    return line if len(line) <= n else line[: n - 3] + "..."


def run_one(
    name: str, size: int, workdir: Path, row_file: Path, held_n: int, range_steps: int, layer_samples: int,
    targets: str | None, bn_warmup: int, preflight: bool = True, float_weights: str | None = None,
    timing_runs: int = 3,
) -> None:
    """Run one model and keep ``row_file`` up to date (the parent reads it even after a crash)."""
    import torch

    torch.set_num_threads(1)
    source = ALL_MODELS[name][0]
    built = Path(sys.prefix, ".build.commit")  # written by scripts/zoo_env.sh
    row: dict[str, Any] = {"model": name, "source": source, "size": size, "stage": "build",
                           "commit": built.read_text().strip() if built.exists() else "unknown"}
    t0 = time.perf_counter()

    def save() -> None:
        row["seconds"] = round(time.perf_counter() - t0, 1)
        tmp = row_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        tmp.replace(row_file)

    def stage(s: str) -> None:
        row["stage"] = s
        save()

    save()
    try:
        import lightning_ncnnqat as lq
        from lightning_ncnnqat import ExportError

        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = build_model(name, source, workdir)
        example = torch.randn(1, 3, size, size, generator=g)
        stage("bn_warmup")
        row["bn_warmed"] = warm_batchnorm(model, size, bn_warmup, g)
        stage("prepare_qat")
        tlist = targets.split(",") if targets else "auto"
        if preflight and "targets" in inspect.signature(lq.prepare_qat).parameters:
            # the Trainer-less QAT start, the same one QATCallback runs: the export preflight, every
            # int8 layer run once on each target, the wrong ones re-planned as float
            tp = time.perf_counter()
            plan = lq.prepare_qat(model, example, targets=tlist)
            row["start_path"] = "prepare_qat(targets=)"
            row["preflight_s"] = round(time.perf_counter() - tp, 1)
            row["preflight_float"] = {n: r for n, r in plan.float_layers.items() if "measured at QAT start" in r}
        else:
            plan = lq.prepare_qat(model, example)
            row["start_path"] = "prepare_qat" + ("+keep_wrong_layers_in_float" if preflight else "")
        if preflight and row["start_path"] != "prepare_qat(targets=)":
            # older package: what QATCallback does at QAT start, called by its parts
            stage("preflight")
            from lightning_ncnnqat.export.preflight import keep_wrong_layers_in_float

            tp = time.perf_counter()
            row["preflight_float"] = keep_wrong_layers_in_float(model, example, targets=tlist)
            row["preflight_s"] = round(time.perf_counter() - tp, 1)
            from lightning_ncnnqat.qat.plan import get_plan

            plan = get_plan(model)
        row["int8_layers"] = len(plan.layers)
        row["float_layers"] = len(plan.float_layers)
        row["float_reasons"] = {k: _first_line(v, 160) for k, v in plan.float_layers.items()}
        grouped = [n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels]
        row["grouped_convs"] = {"int8": [n for n in grouped if n in plan.layers],
                                "float": {n: _first_line(plan.float_layers.get(n, "?"), 160)
                                          for n in grouped if n not in plan.layers}}
        stage("ranges")
        model.train()
        with torch.no_grad():
            for _ in range(range_steps):
                model(torch.randn(4, 3, size, size, generator=g))
        held = torch.randn(held_n, 3, size, size, generator=g)
        stage("export")
        export_dir = workdir / "export"
        try:
            lq.export(model, export_dir, example_input=example, held_batch=held, held_batch_source="random images",
                      verbose=True, timing_runs=timing_runs, layer_check_samples=layer_samples,
                      **({"targets": targets.split(",")} if targets else {}),
                      **({"float_weights": float_weights} if float_weights else {}))
            row["export_ok"] = True
            row["failures"] = []
        except ExportError as e:
            row["export_ok"] = False
            row["failures"] = [
                {"step": s, "layer": lay, "message": _first_line(m)} for s, lay, m in getattr(e, "failures", [])
            ] or [{"step": e.step, "layer": e.layer, "message": _first_line(e.message)}]
        rep_path = export_dir / "report.json"
        row["report_json"] = rep_path.exists()
        if rep_path.exists():
            rep = json.loads(rep_path.read_text())
            iq = rep.get("int8_vs_qat") or {}
            row["int8_cos"] = iq.get("cosine")
            row["top1"] = iq.get("top1_agreement")
            row["float_weights"] = rep.get("float_weights")
            row["int8_bin"] = (rep.get("sizes") or {}).get("int8_bin")
            row["timing"] = rep.get("timing") or {}
            row["targets"] = {
                t: {"profile": e.get("profile"), "cos": (e.get("int8_vs_qat") or {}).get("cosine"),
                    "top1": (e.get("int8_vs_qat") or {}).get("top1_agreement"),
                    "strict_cos": (e.get("int8_vs_qat_strict") or {}).get("cosine"),
                    "flagged": e.get("flagged_layers", []), "error": e.get("error")}
                for t, e in (rep.get("runtime") or {}).items()
            }
            checks = [c for c in rep.get("layer_checks", []) if isinstance(c.get("isolated_cosine"), (int, float))]
            if checks:
                w = min(checks, key=lambda c: c["isolated_cosine"])
                row["worst_layer"] = [w["torch_name"], w["isolated_cosine"]]
            row["flagged"] = rep.get("flagged_layers", [])
            row["report_failures"] = rep.get("failures", [])
            row["warnings"] = [_first_line(w, 200) for w in rep.get("warnings", [])]
        stage("floor")
        try:
            row["floor_cos"] = float32_floor(model, held)
        except Exception as e:  # noqa: BLE001 - the floor is a reference figure, never a failure
            row["floor_error"] = f"{type(e).__name__}: {_first_line(str(e))}"
        stage("done")
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {_first_line(str(e))}"
        row["traceback"] = traceback.format_exc()[-3000:]
        save()


# ----------------------------------------------------------------------------- parent: the table
def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def run_child(name: str, size: int, args: argparse.Namespace, workroot: Path) -> dict[str, Any]:
    """Run one model in a subprocess; a crash or a timeout becomes a row naming the stage it died in."""
    workdir = workroot / name
    workdir.mkdir(parents=True, exist_ok=True)
    row_file = workdir / "row.json"
    row_file.unlink(missing_ok=True)
    log = workdir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--size", str(size),
           "--workdir", str(workdir), "--held", str(args.held), "--range-steps", str(args.range_steps),
           "--layer-samples", str(args.layer_samples), "--bn-warmup", str(args.bn_warmup),
           "--timing-runs", str(args.timing_runs)] + (["--targets", args.targets] if args.targets else []) \
        + (["--float-weights", args.float_weights] if args.float_weights else []) + ([] if args.preflight else ["--no-preflight"])
    env = {**os.environ, **OFFLINE_ENV}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(workdir),
                             start_new_session=True)
        try:
            rc = p.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    row: dict[str, Any] = {"model": name, "source": ALL_MODELS[name][0], "size": size}
    if row_file.exists():
        row.update(json.loads(row_file.read_text()))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["log"] = str(log)
    if rc is None:
        row["error"] = f"timeout after {args.timeout} s in stage '{row.get('stage')}'"
    elif rc != 0 and row.get("stage") != "done":
        why = _signal_name(rc) if rc < 0 else f"exit code {rc}"
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] if log.exists() else []
        row.setdefault("error", f"process died ({why}) in stage '{row.get('stage')}'" + (f": {tail[0][:160]}" if tail else ""))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(ALL_MODELS), metavar="NAME",
                    help=f"subset to run (default: all of {', '.join(MODELS)}; also: {', '.join(EXTRA_MODELS)})")
    ap.add_argument("--size", type=int, default=None, help="input height = width for every model (default: per model)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per model (default 1200)")
    ap.add_argument("--held", type=int, default=4, help="images in the held batch (default 4)")
    ap.add_argument("--range-steps", type=int, default=3, help="training-mode forwards that set the ranges (default 3)")
    ap.add_argument("--layer-samples", type=int, default=2,
                    help="held images in the per-layer check (default 2; it dominates the export time)")
    ap.add_argument("--bn-warmup", type=int, default=4,
                    help="float training-mode batches that set the BatchNorm statistics before prepare_qat "
                         "(default 4; 0: keep the init statistics, mean 0 / var 1)")
    ap.add_argument("--targets", default=None,
                    help="export's runtime targets, comma-separated (default: export's own default, 'auto')")
    ap.add_argument("--float-weights", default=None, choices=["fp32", "fp16"],
                    help="export's storage of float layers' weights (default: export's own default)")
    ap.add_argument("--no-preflight", dest="preflight", action="store_false",
                    help="skip the QAT-start preflight (by default the layers a target computes wrongly go float, "
                         "as QATCallback does)")
    ap.add_argument("--timing-runs", type=int, default=3, help="timed inferences per model in the export (default 3)")
    ap.add_argument("--workdir", default=None, help="where each model's export and log go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write all rows to this json file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        wd = Path(args.workdir)
        run_one(args.child, args.size, wd, wd / "row.json", args.held, args.range_steps, args.layer_samples, args.targets,
                args.bn_warmup, args.preflight, args.float_weights, args.timing_runs)
        return 0

    workroot = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ncnnqat_zoo_"))
    import torch

    built = Path(sys.prefix, ".build.commit")  # written by scripts/zoo_env.sh
    commit = built.read_text().strip() if built.exists() else "unknown"
    print(f"zoo: torch {torch.__version__}, lightning_ncnnqat from commit {commit}, {len(args.models)} models, "
          f"outputs under {workroot}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for name in args.models:
        size = args.size or ALL_MODELS[name][1]
        row = run_child(name, size, args, workroot)
        rows.append(row)
        status = "ok" if row.get("export_ok") and not row.get("flagged") and not row.get("error") else "FAULT"
        print(f"zoo: {name:<22} {status:<5} {row['seconds']:7.1f} s  {fault(row)}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{table(rows)}\n\nzoo: {len(rows)} models in {time.perf_counter() - t_all:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check ``lightning_ncnnqat.qat.export_form`` against ultralytics' own ncnn export form (runs in .venv-zoo).

    nice -n 10 .venv-zoo/bin/python benchmarks/ultralytics_form.py [yolov8n yolov8n-pose ...]

For each model (random init, from its yaml, offline): the reference is what
``ultralytics/engine/exporter.py`` (8.4.x, ``Exporter.__call__``) does before ``export_ncnn``
with default arguments: a deep copy with ``end2end = False`` (ncnn has no top-k), then on every
Detect-family head ``dynamic=False, export=True, format="ncnn", max_det, agnostic_nms=False,
xyxy=False, shape=None``, ``export=True`` on Classify, and ``model.fuse()`` (BatchNorm fused
into the convs, the unused head branch removed). Our form is the unfused model inside
``export_form``. Printed per model: output shapes of both and the worst output cosine (BN
fusion changes float rounding only), and that the model's Python form is back afterwards.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch

MODELS = ["yolov8n", "yolov8n-pose", "yolov8n-seg", "yolov8n-obb", "yolov10n", "yolo26n", "yolov8n-cls"]


def _list(y: object) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]  # type: ignore[list-item]


def main(names: list[str]) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics_cfg_"))
    from ultralytics.nn.modules.head import Classify, Detect
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel

    from lightning_ncnnqat.qat.export_form import export_form

    torch.set_num_threads(1)
    builders = {"pose": PoseModel, "seg": SegmentationModel, "obb": OBBModel, "cls": ClassificationModel}
    bad = 0
    for name in names:
        torch.manual_seed(0)
        model = builders.get(name.rsplit("-", 1)[-1], DetectionModel)(f"{name}.yaml", verbose=False).eval()
        size = 224 if name.endswith("-cls") else 320
        x = torch.randn(1, 3, size, size)
        ref = copy.deepcopy(model)
        if hasattr(ref, "end2end"):
            ref.end2end = False
        for m in ref.modules():
            if isinstance(m, Classify):
                m.export, m.format = True, "ncnn"
            if isinstance(m, Detect):
                m.dynamic, m.export, m.format, m.xyxy, m.shape, m.agnostic_nms = False, True, "ncnn", False, None, False
                m.max_det = min(300, sum(int(size / s) ** 2 for s in ref.stride.tolist()))
        ref = ref.fuse(verbose=False)
        with torch.no_grad():
            want = _list(ref(x))
            with export_form(model):
                got = _list(model(x))
            after = model(x)
        shapes_ok = [t.shape for t in want] == [t.shape for t in got]
        cos = min(
            float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))
            for a, b in zip(want, got)
        ) if shapes_ok else float("nan")
        ok = shapes_ok and cos > 0.99999 and isinstance(after, tuple)
        bad += not ok
        print(f"{name:<13} ultralytics ncnn form {[tuple(t.shape) for t in want]}  export_form "
              f"{[tuple(t.shape) for t in got]}  worst cosine {cos:.7f}  python form back: "
              f"{isinstance(after, tuple)}  {'ok' if ok else 'MISMATCH'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or MODELS))

"""Integer inputs (token ids, class ids) through QAT, export, conversion and parity (issue 19, item 6).

PyTorch and ONNX keep them int64; pnnx traces them as i64; ncnn's ``Embed`` reads its input Mat
as int32 (``((const int*)bottom_blob)[q]``, ncnn ``src/layer/embed.cpp``), so the runtime checks
write the ids into the Mat as int32. The Embedding stays float (ncnn Embed), conv/Linear int8.
"""

from __future__ import annotations

import json
import subprocess
import sys

import ncnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ncnnqat import QATConfig, prepare_qat
from lightning_ncnnqat.errors import NcnnQatError
from lightning_ncnnqat.export import ExportError, export
from lightning_ncnnqat.ncnn.isolated import ncnn_inputs

torch.set_num_threads(1)


class TextCNN(nn.Module):
    """ids [N, T] -> Embedding -> [N, E, 1, T] -> Conv2d(1x3) + BN + ReLU -> max over time -> Linear."""

    def __init__(self, vocab: int = 50, emb: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.conv = nn.Sequential(nn.Conv2d(emb, 24, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids).permute(0, 2, 1).unsqueeze(2)
        return self.fc(self.conv(e).amax(dim=(2, 3)))


class Conditional(nn.Module):
    """(image float [N, 3, 8, 8], label int [N]) -> conv + a per-class channel offset -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Embedding(10, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x) + self.cls(label).reshape(-1, 8, 1, 1))
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


def _train(model: nn.Module, batches: list, steps: int = 4) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for i in range(steps):
        b = batches[i % len(batches)]
        out = model(*b) if isinstance(b, tuple) else model(b)
        loss = F.cross_entropy(out, torch.arange(len(out)) % out.shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _ids(n: int, seed: int, t: int = 12, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_embedding_text_model_exports_with_parity(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    m = TextCNN()
    plan = prepare_qat(m, _ids(2, 0))
    assert set(plan.layers) == {"conv.0", "fc"} and "emb" not in plan.layers
    _train(m, [_ids(16, s) for s in range(3)])
    held = _ids(24, 7)
    rep = export(m, tmp_path, held[:1], held, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert rep.int8_vs_qat.cosine > 0.999 and rep.int8_vs_qat.top1_agreement >= 0.95
    assert rep.float_vs_torch.cosine > 0.9999
    param = (tmp_path / "model.int8.param").read_text()
    types = [line.split()[0] for line in param.splitlines()[2:]]
    assert "Embed" in types and "Convolution" in types and "InnerProduct" in types
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["io"]["inputs"][0]["dtype"] == "int64"
    # plain ncnn, ids written as int32 (what Embed reads), agrees with the PyTorch QAT model
    net = ncnn.Net()
    assert net.load_param(str(tmp_path / "model.int8.param")) == 0
    assert net.load_model(str(tmp_path / "model.int8.bin")) == 0
    with torch.no_grad():
        ref = m(held[:8]).numpy()
    for i in range(8):
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(np.ascontiguousarray(held[i].numpy().astype(np.int32)).view(np.float32)).clone())
        got = np.array(ex.extract("out0")[1])
        assert np.abs(got - ref[i]).max() < 0.05 * np.abs(ref).max()
    # the deploy kit's run_int8.py takes an int64 .npy of ids the same way
    np.save(tmp_path / "ids.npy", held[2].numpy())
    subprocess.run([sys.executable, str(tmp_path / "run_int8.py"), str(tmp_path / "ids.npy"), "--save",
                    str(tmp_path / "kit.npz")], check=True, capture_output=True)
    assert np.abs(np.load(tmp_path / "kit.npz")["out0"] - ref[2]).max() < 0.05 * np.abs(ref).max()
    # DEPLOY.md tells a C++ user the ids go in as int32
    note = (tmp_path / "DEPLOY.md").read_text()
    assert "Input(s) `in0` hold token ids" in note and "int32" in note


def test_two_input_model_with_an_integer_input_exports(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    m = Conditional()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    plan = prepare_qat(m, (batches[0][0][:2], batches[0][1][:2]))
    assert set(plan.layers) == {"conv", "conv2", "fc"}
    _train(m, batches)
    held = (torch.randn(20, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (20,), generator=g))  # float64 images
    rep = export(m, tmp_path, (held[0][:1], held[1][:1]), held, targets=["x86"], verbose=False, timing_runs=0)
    assert rep.ok, rep.summary()
    assert rep.int8_vs_qat.cosine > 0.999
    assert [i["dtype"] for i in json.loads((tmp_path / "report.json").read_text())["io"]["inputs"]] == ["float32", "int64"]
    note = (tmp_path / "DEPLOY.md").read_text()
    assert "Input(s) `in1` hold token ids" in note and "`in0`" not in note.split("hold token ids")[0].splitlines()[-1]


def test_id_inputs_follow_split_copies_and_need_embed_only() -> None:
    """Inputs read only by Embed (directly or through Split) take int32 ids; one also read by a
    float layer does not (that model casts the ids to float itself)."""
    from lightning_ncnnqat.ncnn.param import NcnnParam

    head = "7767517\n{} {}\n"
    body = [
        "Input in0 0 1 in0", "Input in1 0 1 in1", "Input in2 0 1 in2",
        "Split sp 1 2 in0 a b", "Embed e1 1 1 a ea 0=4 1=10 3=40", "Embed e2 1 1 b eb 0=4 1=10 3=40",
        "Embed e3 1 1 in1 ec 0=4 1=10 3=40", "Split sp2 1 2 in2 c d", "Embed e4 1 1 c ed 0=4 1=10 3=40",
        "ReLU r 1 1 d ee",
    ]
    param = NcnnParam.parse(head.format(len(body), 12) + "\n".join(body) + "\n")
    assert param.id_inputs() == {"in0", "in1"}


def test_calibrated_start_reads_integer_batches() -> None:
    torch.manual_seed(0)
    m = TextCNN()
    prepare_qat(m, _ids(2, 0), QATConfig(range_init="absmax"), calibration_data=[_ids(8, s) for s in range(2)])
    q = m.conv[0].input_quantizer
    assert float(q.running_absmax) > 0


def _param(*lines: str) -> str:
    """An ncnn .param text of ``lines`` ("Type name n_in n_out blobs... params...")."""
    blobs = set()
    for line in lines:
        tok = line.split()
        blobs.update(tok[4 : 4 + int(tok[2]) + int(tok[3])])
    return f"7767517\n{len(lines)} {len(blobs)}\n" + "\n".join(lines) + "\n"


def test_ncnn_inputs_follow_what_reads_the_blob() -> None:
    embed_via_split = _param(
        "Input in0 0 1 in0", "Split sp 1 2 in0 a b", "Embed e1 1 1 a c 0=4 1=10 2=0 3=40",
        "Embed e2 1 1 b d 0=4 1=10 2=0 3=40", "Input in1 0 1 in1", "ReLU r 1 1 in1 f",
    )
    ids = np.array([[1, 7, 3]], dtype=np.int64)
    img = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float64)
    arrays, as_ids = ncnn_inputs(embed_via_split, {"in0": ids, "in1": img})
    assert as_ids == ["in0"] and arrays["in0"].dtype == np.int32 and arrays["in1"].dtype == np.float32
    assert arrays["in0"].tolist() == [[1, 7, 3]]
    # an integer input read by a float layer goes as float values
    arrays, as_ids = ncnn_inputs(_param("Input in0 0 1 in0", "ReLU r 1 1 in0 x"), {"in0": ids})
    assert as_ids == [] and arrays["in0"].dtype == np.float32 and arrays["in0"].tolist() == [[1.0, 7.0, 3.0]]
    mixed = _param("Input in0 0 1 in0", "Split sp 1 2 in0 a b", "Embed e 1 1 a c 0=4 1=10 2=0 3=40", "ReLU r 1 1 b d")
    with pytest.raises(NcnnQatError, match=r"integer input 'in0' \(int64\) is read by Embed 'e' .* and by ReLU 'r'"):
        ncnn_inputs(mixed, {"in0": ids})
    with pytest.raises(NcnnQatError, match="outside int32"):
        ncnn_inputs(embed_via_split, {"in0": np.array([[2**40]]), "in1": img})


def test_model_casting_ids_to_float_names_the_integer_input(tmp_path) -> None:  # noqa: ANN001
    class Casts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(ids.float() / 50)

    m = Casts()
    prepare_qat(m, _ids(2, 0))
    _train(m, [_ids(8, 1)], steps=1)
    with pytest.raises(ExportError, match=r"casts an integer input \(in0 \(torch.int64\)\)"):
        export(m, tmp_path, _ids(1, 2), _ids(4, 3), targets=["x86"], verbose=False, timing_runs=0)


def test_callback_fit_on_token_ids_with_calibrated_start(tmp_path) -> None:  # noqa: ANN001
    """QATCallback on a text model: the KL start calibrates on id batches, the held batch keeps
    ids from the validation loader, the preflight and the export run on them."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ncnnqat import QATCallback
    from lit_models import NetLit, quiet_trainer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 50, (48, 12), generator=g), torch.randint(0, 4, (48,), generator=g))
    cb = QATCallback(start_epoch=1, export_dir=str(tmp_path / "export"), targets=["x86"], verbose=False, range_init="kl")
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb])
    trainer.fit(NetLit(TextCNN(), lr=0.05), DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=16))
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["ok"], report.get("failures")
    assert report["io"]["inputs"][0]["dtype"] == "int64" and report["held_batch"]["n"] == 48


def test_calibrate_on_ids_with_ncnn_activations_matches_torch() -> None:
    """ncnn2table-style calibration reads the layer inputs from ncnn's float runtime: the ids go
    to pnnx as i64 and into ncnn's Embed as int32, so both sources see the same activations."""
    from lightning_ncnnqat.calibration import calibrate

    torch.manual_seed(0)
    m = TextCNN()
    data = [_ids(8, s) for s in range(2)]
    by_torch = calibrate(m, data, method="kl", activations="torch").layers
    by_ncnn = calibrate(m, data, method="kl", activations="ncnn").layers
    assert set(by_torch) == {"conv.0", "fc"}
    for name in by_torch:
        assert by_ncnn[name].input_threshold == pytest.approx(by_torch[name].input_threshold, rel=1e-3)
